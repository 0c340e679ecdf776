"""Select with a pretrained InfluenceNetwork: no oracle, no valuation model, only the network's sentence encoder.

A network distilled once (`nn_cift`, `hf-influence fit-network`) and shared on the Hub predicts the influence of
any pool row on any target row from their sentence embeddings. `select_with_network` loads it (a Hub repo id, a
folder, or the object), embeds the new pool and targets with the encoder the network records, predicts and
selects by the rule of the network's oracle (see `registry.oracle_rule`), streaming the pool for the
streaming rules. Before anything is embedded it logs what the network is and what it was measured to do on
rows and targets it never saw (its Q4 figures travel in its config), because that is what the user is trusting.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset

from .encoders import row_embedder, text_format_of
from ..engine import as_dataset
from ..artifacts.fit_folder import FitFolder
from ..formatting import FormattingConfig
from ..models import load_model, looks_like_local_path
from .network import InfluenceNetwork
from ..rds_embeddings import LM_ENCODER, LM_ENCODER_PREFIX, parse_lm_encoder_id
from ..registry import oracle_rule
from ..artifacts.scores import ScoreTable, provenance_record, rows_digest
from ..selection.rules import GROUPED_RULES, choose_rows, parse_budget, resolve_budget
from ..extraction.store import fingerprint_dataset
from ..selection.streaming import ScoreStream
from ..verbosity import get_logger

logger = get_logger(__name__)


def load_network(network: str | os.PathLike | InfluenceNetwork, revision: str | None = None) -> InfluenceNetwork:
    """An InfluenceNetwork from a Hub repo id, a saved folder, or a `fit-network` output folder (its `network/`).

    Raises:
        FileNotFoundError: a local path that does not exist or holds no network (named as such, not as a repo id).
    """
    if isinstance(network, InfluenceNetwork):
        return network
    path = Path(network)
    if path.is_dir():
        return FitFolder(path).network()
    if path.exists() or looks_like_local_path(str(network)):
        raise FileNotFoundError(f"{network} is not a folder holding an InfluenceNetwork (config.json and "
                                f"model.safetensors, or a fit-network output with network/).")
    return InfluenceNetwork.from_pretrained(str(network), revision=revision)


def unseen_quadrant(network: InfluenceNetwork) -> tuple[str, dict] | None:
    """(name, figures) of the network's measured quadrant of unseen rows and targets: Q4 (pairwise) or Q3
    (pointwise: unseen rows); None when it carries no figures."""
    metrics = network.config.get("metrics") or {}
    name = "Q4" if "Q4" in metrics else "Q3" if "Q3" in metrics else None
    return None if name is None else (name, metrics[name])


def network_summary(network: InfluenceNetwork) -> str:
    """One paragraph: the network's oracle, valuation model, encoder, and its measured figures on unseen rows and
    targets (Q4, or Q3 for a pointwise network), or a warning that it carries none."""
    config = network.config
    head = (f"InfluenceNetwork ({config['kind']}) distilled from the {config['oracle']!r} oracle"
            + (f" with {config['valuation_model']}" if config.get("valuation_model") else "")
            + f", reading {config['embedding_model']} embeddings.")
    measured = unseen_quadrant(network)
    if measured is None:
        return head + (" It carries no measured figures: nothing says how well it predicts rows and targets it "
                       "never saw (fit it with evaluation_fraction > 0).")
    quadrant_name, quadrant = measured
    spearman, column = quadrant.get("spearman"), quadrant.get("column_spearman")
    return head + (
        f" Measured on {quadrant['rows']} unseen rows x {quadrant['columns']} "
        f"{'unseen targets' if quadrant_name == 'Q4' else 'targets'} ({quadrant_name}): Spearman "
        f"{'n/a' if spearman is None else f'{spearman:.3f}'}"
        + ("" if column is None else f" (per target {column:.3f})")
        + f", MSE {quadrant['mse']:.4f} against {quadrant['mean_baseline_mse']:.4f} for predicting the mean"
        + ("" if quadrant["mse"] < quadrant["mean_baseline_mse"] else
           " (no better than the mean: treat its ranking with caution)") + ".")


def select_with_network(
    pool: Dataset | list[dict] | str,
    target: Dataset | list[dict] | str,
    network: str | os.PathLike | InfluenceNetwork,
    budget: int | float,
    selection: str | None = None,
    selection_seed: int = 0,
    target_task_column: str | None = "task",
    encoder=None,
    encoder_batch_size: int = 64,
    model=None,
    tokenizer=None,
    formatting: FormattingConfig | None = None,
    revision: str | None = None,
    show_progress: bool = True,
    return_scores: bool = False,
) -> Dataset | tuple[Dataset, ScoreTable]:
    """Select `budget` pool rows for `target` with a pretrained InfluenceNetwork (no oracle call).

    Args:
        pool, target: rows (Dataset, list of dicts, or a file / folder / Hub dataset id) in any row format the
            library reads (chat or prompt/response); a pointwise network ignores the target.
        network: Hub repo id, folder, or InfluenceNetwork.
        budget: rows (int) or pool share (float in (0, 1)).
        selection: the rule; None: the rule of the network's oracle (registry.oracle_rule; round-robin otherwise).
        selection_seed: seed of the round-robin order.
        target_task_column: target column naming each row's task (for round_robin_task and less); ignored when
            absent.
        encoder: a loaded SentenceTransformer to use instead of loading the network's (its id must match).
        encoder_batch_size: rows per encoder call.
        model, tokenizer: for a network that reads the valuation model's hidden states (embedding_model
            "lm:<id>"): that model (default: loaded from the recorded id) and its tokenizer.
        formatting: how such a network's rows are formatted (max_length, columns); the default FormattingConfig.
        revision: Hub revision of the network.
        show_progress: show the encoders' progress bars.
        return_scores: also return the ScoreTable [pool rows x targets] (then the scores are held in memory;
            without it a streaming rule never holds the [n, m] matrix).

    Returns:
        The selected rows in selection order, or (rows, ScoreTable).

    Raises:
        ValueError: the network was fitted on texts made another way than this version makes them, the encoder
            is another model, or a bad budget / rule.
    """
    budget_value = parse_budget(budget)
    network = load_network(network, revision)
    expected_format = text_format_of(network.embedding_model)
    if network.text_format is not None and network.text_format != expected_format:
        raise ValueError(f"this network was fitted on rows embedded as {network.text_format!r}; this version of "
                         f"hf-influence embeds them as {expected_format!r}, so its predictions would not apply: refit it, "
                         f"or use the hf-influence version it was made with.")
    pool = as_dataset(pool, "pool")
    pointwise = network.kind == "pointwise"
    target = None if pointwise and target is None else as_dataset(target, "target")
    budget_rows = resolve_budget(budget_value, len(pool))
    rule = selection or oracle_rule(network.oracle)
    # The figures the user is trusting, shown at the default verbosity (transformers' set_verbosity_error()
    # silences them).
    logger.warning(network_summary(network))
    lm_pooling, lm_blocks = "mean", None
    if (network.embedding_model or "").startswith(LM_ENCODER_PREFIX):
        model_id, lm_pooling, lm_blocks = parse_lm_encoder_id(network.embedding_model)
        if model is None or isinstance(model, str):
            model, tokenizer = load_model(model or model_id)
        elif tokenizer is None:
            raise ValueError("tokenizer=... is required with a model object (pass its tokenizer).")
        encoder = LM_ENCODER
    embed, encoder_id, encoder_revision, _ = row_embedder(encoder if encoder is not None else network.embedding_model,
                                                          model, tokenizer, formatting, encoder_batch_size,
                                                          show_progress, lm_pooling, lm_blocks)
    if network.embedding_revision is not None and encoder_revision != network.embedding_revision:
        logger.warning("The encoder %s loaded at revision %s, the network was fitted on revision %s: if its weights "
                       "differ, so do the embeddings the network reads.", encoder_id, encoder_revision,
                       network.embedding_revision)
    pool_embeddings = embed(pool)
    target_embeddings = None if pointwise else embed(target)
    groups = None
    if rule in GROUPED_RULES and not pointwise and target_task_column in target.column_names:
        groups = list(target[target_task_column])
    stream = ScoreStream(pool_embeddings, network, target_embeddings=target_embeddings, embedding_model=encoder_id)
    if not return_scores:  # a streaming rule never holds the [n, m] matrix
        chosen = choose_rows(budget_rows, rule, selection_seed, stream=stream, scores=stream.scores,
                             target_groups=groups)
        return pool.select(chosen.tolist())
    scores = stream.scores()
    chosen = choose_rows(budget_rows, rule, selection_seed, scores=scores, target_groups=groups)
    selected = pool.select(chosen.tolist())
    names = ["pointwise"] if pointwise else [
        str(i) for i in (target["id"] if "id" in target.column_names else range(len(target)))]
    tasks = None if groups is None else dict(zip(names, groups))
    record = provenance_record(method="nn_cift_predict", network=network.config, selection=rule,
                               budget=budget_rows, selected_pool_row_ids=chosen.tolist(),
                               pool_fingerprint=fingerprint_dataset(pool),
                               pool_rows_digest=rows_digest(pool, range(len(pool))),
                               target_fingerprint=None if target is None else fingerprint_dataset(target),
                               target_tasks=tasks)
    table = ScoreTable.from_matrix(scores, list(range(len(pool))), names, provenance=record)
    return selected, table

