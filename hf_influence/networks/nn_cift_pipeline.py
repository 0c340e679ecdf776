"""NN-CIFT (docs/algorithms.md §2): distil an expensive influence oracle into a small InfluenceNetwork.

1. Embed every pool and target row with a sentence encoder (cached, batched).
2. Run the oracle on a seeded random block: u of the pool rows x u of the target columns (u = 0.05).
3. Fit an InfluenceNetwork on the block (validation split, early stopping).
4. Predict every (pool, target) pair through the network's factorisation; the block keeps its true values.

`nn_cift(...)` returns the network (shareable with `push_influence_network`), the full score matrix and the
cost split; `method="nn_cift"` in `select_by_influence` runs it and selects from its scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from torch import Tensor

from .encoders import row_embedder
from ..formatting import FormattingConfig
from ..artifacts.hub import push_influence_network
from ..models import DEFAULT_MODEL, load_model
from .network import InfluenceNetwork, standardize_columns
from ..options import NNCIFTConfig, split_options
from .oracles import Oracle
from ..registry import ORACLES, oracle_rule
from ..rds_embeddings import LM_ENCODER
from ..artifacts.scores import ScoreTable, provenance_record, rows_digest
from ..extraction.store import fingerprint_dataset
from ..selection.streaming import predict_scores


@dataclass
class NNCIFTResult:
    """What `nn_cift` returns.

    Attributes:
        network: the fitted InfluenceNetwork.
        scores: [n, m] predicted scores with the block's true values in place, in oracle units (per-target
            standard units with network_label_normalization="column"); [n, 1] pointwise; None with predict=False.
        block_rows: [u_n] pool rows the oracle scored; block_columns: [u_m] target columns it scored.
        block_labels: [u_n, u_m] the oracle's values on the block, in the units of `scores`.
        pool_embeddings: [n, e]; target_embeddings: [m, e].
        seconds: cost split {"embed", "oracle", "fit", "predict"} (and "evaluation" when evaluated).
        evaluation: `network.evaluate` quadrant figures (None without config.evaluation_fraction).
        evaluation_pairs: (predicted, true) values of the evaluated Q4 pairs, for plots (None without).
        evaluation_block: (rows [r], columns [c], labels [r, c]) the oracle scored for the evaluation: the
            training block's rows and columns first, then the fresh ones (None without).
    """

    network: InfluenceNetwork
    scores: Tensor | None
    block_rows: Tensor
    block_columns: Tensor
    block_labels: Tensor
    pool_embeddings: Tensor
    target_embeddings: Tensor
    seconds: dict[str, float]
    evaluation: dict | None = None
    evaluation_pairs: tuple[Tensor, Tensor] | None = None
    evaluation_block: tuple[Tensor, Tensor, Tensor] | None = None

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    license: str | None = None) -> str:
        """Push the network with its card (oracle, encoder, training block, measured quadrants) and, when the
        result was evaluated, its predicted-vs-true plot (`hub.push_influence_network`). Returns the repo URL."""
        training = {"block_rows": len(self.block_rows), "block_columns": len(self.block_columns),
                    "block_fraction": len(self.block_rows) / len(self.pool_embeddings)}
        return push_influence_network(self.network, repo_id, training=training, evaluation=self.evaluation,
                                      plot=self.evaluation_pairs, private=private, token=token, license=license)

    def score_table(self, pool: Dataset, target: Dataset, config: NNCIFTConfig, **provenance) -> ScoreTable:
        """The predictions as a ScoreTable: every pool row (row ids 0..n-1) x target (the target's `id`s, or
        positions; one "pointwise" column for a pointwise oracle), the oracle's block rows flagged as landmarks,
        and a provenance with the method, oracle, config and fingerprints, plus the given fields.

        Raises:
            ValueError: the result holds no scores (made with predict=False).
        """
        if self.scores is None:
            raise ValueError("this NNCIFTResult has no scores (nn_cift(..., predict=False)); predict them first")
        names = [str(i) for i in (target["id"] if "id" in target.column_names else range(len(target)))]
        mask = torch.zeros(len(pool), dtype=torch.bool)
        mask[self.block_rows] = True
        # The rule a later selection from the table takes (the trainer reads it): the oracle's paper's.
        record = provenance_record(method="nn_cift", oracle=config.oracle, configs=asdict(config),
                                   selection=oracle_rule(config.oracle),
                                   pool_fingerprint=fingerprint_dataset(pool),
                                   pool_rows_digest=rows_digest(pool, range(len(pool))),
                                   target_fingerprint=fingerprint_dataset(target), **provenance)
        return ScoreTable.from_matrix(self.scores, list(range(len(pool))),
                                      names if self.scores.shape[1] > 1 else ["pointwise"], landmark_mask=mask,
                                      provenance=record)


def make_oracle(config: NNCIFTConfig, model=None, tokenizer=None, optimizer=None, show_progress: bool = True,
                **options) -> Oracle:
    """The oracle named by `config.oracle` (its registered factory); `options` go to method oracles
    (select_by_influence options)."""
    return ORACLES[config.oracle].factory(config, model, tokenizer, optimizer, show_progress, **options)


def block_indices(num_rows: int, num_columns: int, config: NNCIFTConfig) -> tuple[Tensor, Tensor]:
    """Seeded random block: (sorted pool rows [u_n], sorted target columns [u_m])."""
    generator = torch.Generator().manual_seed(config.nn_cift_seed)
    rows = min(num_rows, max(config.min_block_rows, math.ceil(config.block_fraction * num_rows)))
    columns = min(num_columns, max(1, math.ceil(config.block_fraction * num_columns)))
    return (torch.randperm(num_rows, generator=generator)[:rows].sort().values,
            torch.randperm(num_columns, generator=generator)[:columns].sort().values)


def block_overrides(rows: Tensor, columns: Tensor, labels: Tensor, pointwise: bool) -> dict[str, Tensor]:
    """The oracle's block as the exact values of `streaming.predict_scores` / `stream_select`: rows [u_n] and
    labels [u_n, u_m] on target columns [u_m] (a pointwise oracle: [u_n, 1], every column)."""
    if pointwise:
        return {"exact_rows": rows, "exact_scores": labels}
    return {"exact_rows": rows, "exact_scores": labels, "exact_columns": columns}


def nn_cift(pool: Dataset, target: Dataset, config: NNCIFTConfig | None = None, oracle: Oracle | None = None,
            model=None, tokenizer=None, optimizer=None, show_progress: bool = True, predict: bool = True,
            **options) -> NNCIFTResult:
    """Distil `oracle` (default: `make_oracle(config, model, ...)`) on a block and predict every pair.

    Args:
        pool: [n] pool rows (chat or prompt/response); target: [m] target rows.
        config: NN-CIFT settings.
        oracle: an Oracle instance (overrides config.oracle).
        model, tokenizer, optimizer, **options: for the default oracle (see `make_oracle`). With a `work_dir`
            option the sentence embeddings are also kept there (work_dir/sentence_embeddings/pool and
            target-<fingerprint>), so a rerun after a crash does not encode again, and one work_dir serves
            several targets on the same pool.
        predict: build the [n, m] scores; False leaves `scores` None, for a caller that streams them
            (`streaming.stream_select` with the network, the embeddings and the block as exact values).

    Returns:
        NNCIFTResult with scores [n, m] ([n, 1] for a pointwise oracle).
    """
    config = config or NNCIFTConfig()
    oracle = oracle or make_oracle(config, model, tokenizer, optimizer, show_progress=show_progress, **options)
    seconds = {}
    start = time.perf_counter()
    # Pool-wide oracle state (a method oracle's warm-up on the whole pool) before any block; undone at the end.
    oracle.prepare(pool)
    seconds["prepare"] = time.perf_counter() - start
    try:
        start = time.perf_counter()
        (pool_embeddings, target_embeddings), encoder_id, encoder_revision, text_format = _embeddings(
            pool, target, config, oracle, model, tokenizer, options, show_progress)
        seconds["embed"] = time.perf_counter() - start
        rows, columns = block_indices(len(pool), 1 if oracle.pointwise else len(target), config)
        start = time.perf_counter()
        labels = oracle.compute_block(pool.select(rows.tolist()),
                                      None if oracle.pointwise else target.select(columns.tolist()))
        seconds["oracle"] = time.perf_counter() - start + seconds.pop("prepare")
        network = InfluenceNetwork(
            kind="pointwise" if oracle.pointwise else "pairwise", embedding_dim=pool_embeddings.shape[1],
            hidden_sizes=list(config.network_hidden_sizes), embedding_model=encoder_id, oracle=oracle.name,
            valuation_model=oracle.identity().get("model_id"), seed=config.nn_cift_seed,
            embedding_revision=encoder_revision, text_format=text_format,
            interaction_rank=0 if oracle.pointwise else config.network_interaction_rank,
            label_normalization=config.network_label_normalization,
        )
        start = time.perf_counter()
        network.fit(pool_embeddings[rows], None if oracle.pointwise else target_embeddings[columns],
                    labels[:, 0] if oracle.pointwise else labels, epochs=config.network_epochs,
                    batch_size=config.network_batch_size, lr=config.network_learning_rate,
                    patience=config.network_patience, seed=config.nn_cift_seed, num_threads=config.network_num_threads,
                    validation_split=config.network_validation_split)
        seconds["fit"] = time.perf_counter() - start
        # The block keeps its oracle values, in the units the network predicts.
        if config.network_label_normalization == "column":
            labels = standardize_columns(labels)
        scores = None
        if predict:
            start = time.perf_counter()
            # The same fixed blocks as a streamed selection, so both pick the same rows.
            scores = predict_scores(pool_embeddings, network, None if oracle.pointwise else target_embeddings,
                                    **block_overrides(rows, columns, labels, oracle.pointwise))
            seconds["predict"] = time.perf_counter() - start
        result = NNCIFTResult(network, scores, rows, columns, labels, pool_embeddings, target_embeddings, seconds)
        if config.evaluation_fraction > 0:
            start = time.perf_counter()
            _evaluate(result, oracle, pool, target, config)
            seconds["evaluation"] = time.perf_counter() - start
        return result
    finally:
        oracle.release()


def _embeddings(pool: Dataset, target: Dataset, config: NNCIFTConfig, oracle: Oracle, model, tokenizer,
                options: dict, show_progress: bool) -> tuple[tuple[Tensor, Tensor], str, str | None, str]:
    """((pool [n, e], target [m, e]) embeddings, encoder id, revision, text format) for config.encoder
    (`encoders.row_embedder`). A sentence encoder's embeddings are kept under work_dir/sentence_embeddings when a
    work_dir is given (pool, and the target's store named by its rows, so that one work_dir serves several
    targets). encoder="lm" embeds with the valuation model: the oracle's, else `model`, else the default one."""
    lm_model, lm_tokenizer, formatting = None, None, None
    if config.encoder == LM_ENCODER:
        lm_model = getattr(oracle, "model", None) or model
        lm_tokenizer = getattr(oracle, "tokenizer", None) or tokenizer
        if lm_model is None or isinstance(lm_model, str):
            lm_model, lm_tokenizer = load_model(lm_model or DEFAULT_MODEL)
        formatting = split_options({key: value for key, value in options.items()
                                    if key in FormattingConfig.__dataclass_fields__})[FormattingConfig]
    embed, encoder_id, revision, text_format = row_embedder(config.encoder, lm_model, lm_tokenizer, formatting,
                                                            config.encoder_batch_size, show_progress,
                                                            config.lm_pooling, config.lm_blocks)
    cache = None if options.get("work_dir") is None else Path(options["work_dir"]) / "sentence_embeddings"
    target_store = f"target-{fingerprint_dataset(target)[:16]}"
    embeddings = tuple(embed(rows, None if cache is None else cache / name)
                       for rows, name in ((pool, "pool"), (target, target_store)))
    return embeddings, encoder_id, revision, text_format


def _evaluate(result: NNCIFTResult, oracle: Oracle, pool: Dataset, target: Dataset, config: NNCIFTConfig) -> None:
    """Score the training block's rows and columns plus fresh ones with the oracle; fill the Q1..Q4 figures."""
    generator = torch.Generator().manual_seed(config.nn_cift_seed + 1)

    def with_fresh(seen: Tensor, size: int) -> Tensor:
        unseen = torch.ones(size, dtype=torch.bool)
        unseen[seen] = False
        candidates = unseen.nonzero().flatten()
        count = min(len(candidates), max(1, math.ceil(config.evaluation_fraction * size)))
        fresh = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        return torch.cat([seen, fresh])

    rows = with_fresh(result.block_rows, len(pool))
    columns = result.block_columns if oracle.pointwise else with_fresh(result.block_columns, len(target))
    labels = oracle.compute_block(pool.select(rows.tolist()),
                                  None if oracle.pointwise else target.select(columns.tolist()))
    result.evaluation_block = (rows, columns, labels)
    seen_rows = torch.arange(len(result.block_rows))
    if oracle.pointwise:
        result.evaluation = result.network.evaluate(result.pool_embeddings[rows], None, labels[:, 0], seen_rows)
    else:
        result.evaluation = result.network.evaluate(result.pool_embeddings[rows], result.target_embeddings[columns],
                                                    labels, seen_rows, torch.arange(len(result.block_columns)))
    result.evaluation_pairs = result.network.evaluation_pairs
