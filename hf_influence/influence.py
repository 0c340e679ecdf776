"""`select_by_influence`: one entry point over a registry of selection methods.

    subset = select_by_influence(pool, target, model="HuggingFaceTB/SmolLM2-135M-Instruct", budget=0.05)

Every method turns (pool, target) into a score matrix [pool rows, target rows] (or per-row weights), and
one selection rule (`selection/rules.py`) turns that into pool rows. Options are the fields of the shared config
dataclasses (`SelectionConfig`, `FormattingConfig`, `GradientConfig`, `JVPConfig`, `WarmupConfig`,
`LoraSettings`) and of the method's own (e.g. `InfluenceDistillationConfig`, `NNCIFTConfig`); their names are
unique, so `select_by_influence(..., num_landmarks=512, projection_dim=4096)` routes each keyword to its
dataclass, and an option of a method the run does not use is refused by name.

Influence Distillation (docs/algorithms.md): warm-up (AdamW optimizer state) -> JVP embeddings of the whole
pool -> exact LoRA gradients of k landmarks and of the targets -> P_L = G_L G_T^T -> kernel ridge
regression spreads P_L to every pool row -> robust weights (first order in closed form; second order with
target-Hessian products on the landmarks, Q ~ C Q_L C^T) -> selection.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from datasets import Dataset
from torch import nn

from . import methods  # noqa: F401  (registers every method)
from .engine import as_dataset, compute, select_rows
from .options import SelectionConfig, split_options
from .registry import METHODS
from .artifacts.scores import ScoreTable
from .selection.rules import RULES, resolve_budget
from .verbosity import get_logger

logger = get_logger(__name__)


def select_by_influence(
    pool: Dataset | list[dict] | str,
    target: Dataset | list[dict] | str,
    model: str | nn.Module | None = None,
    budget: float = 0.05,
    method: str | None = None,
    tokenizer=None,
    optimizer: torch.optim.Optimizer | None = None,
    return_scores: bool = False,
    configs: Iterable[Any] | None = None,
    return_details: bool = False,
    **options: Any,
) -> Dataset | tuple[Dataset, ScoreTable] | tuple[Dataset, dict]:
    """Select the pool rows that help most on the target.

    Args:
        pool: candidate training rows (chat `messages` or prompt/response columns): a Dataset, a list of
            dicts, a file path or a Hub dataset id.
        target: rows of the task to improve, same forms.
        model: Hub id / folder, a transformers causal LM or a PEFT LoRA model; None: the embedded default
            (SmolLM2-135M-Instruct). A base model gets a LoRA adapter for the run (removed afterwards);
            a PEFT model's adapter weights are restored after the warm-up trains them.
        budget: number of rows (int) or fraction of the pool (float in (0, 1]).
        method: a registered method (see SelectionConfig.method); overrides options["method"].
        tokenizer: required when `model` is an object.
        optimizer: a torch AdamW / SGD holding the LoRA parameters with state (e.g. your own warm-up);
            skips the built-in warm-up.
        return_scores: also return the ScoreTable (scores of every pool row for every target).
        return_details: also return what the run reports (stage seconds with the total, landmark diagnostics,
            what decided and its exact-gradient cost), without a score table: a streamed selection keeps it so.
            With return_scores the table's provenance["details"] holds the same.
        configs: config dataclass instances (e.g. [SelectionConfig(method="less"), GradientConfig(...)]) as the
            defaults; keyword options override their fields.
        **options: fields of SelectionConfig, FormattingConfig, GradientConfig, JVPConfig, WarmupConfig,
            LoraSettings and of the method's own config (`METHODS[method].config_cls`: num_landmarks=1024 and
            order=2 are InfluenceDistillationConfig's); `peft_config=LoraConfig(...)` gives the adapter as TRL
            does (its settings become LoraSettings).

    Returns:
        `pool.select(indices)`: the selected rows with all pool columns, in selection order (the order the
        rule picked them: round-robin order, or descending score); with return_scores, (dataset, ScoreTable);
        with return_details, (dataset, details dict).

    Raises:
        SelectionError: empty pool/target, budget larger than the usable pool, bad scores.
        FormattingError: missing columns, unknown chat format, a tokenizer without a chat template.
        ValueError: a target row with no label token (the message names it), or bad option values.
        TypeError: an unknown option (with its close matches) or another method's (naming that method).
    """
    if method is not None:
        options["method"] = method
    if return_scores and return_details:
        raise ValueError("return_scores and return_details: pass one (the score table's provenance['details'] "
                         "holds the details).")
    configs = split_options(options, configs)
    config: SelectionConfig = configs[SelectionConfig]
    pool = as_dataset(pool, "pool")
    budget_rows = resolve_budget(budget, len(pool))
    rule = config.selection or METHODS[config.method].selection_rule(configs)
    if rule == "weighted" and not METHODS[config.method].robust_weights:
        raise ValueError(f"selection='weighted' needs robust weights; method {config.method!r} has none (methods "
                         f"with them: {sorted(name for name, spec in METHODS.items() if spec.robust_weights)}).")
    start = time.perf_counter()
    # Without a score table to return, a streaming rule lets the method keep its scores as a predictor
    # (first-order landmark ID): the [n, m] matrix and the [n, e] embeddings are then never held.
    with tempfile.TemporaryDirectory(prefix="hf_influence_") as scratch:
        run = compute(pool, target, model, tokenizer, optimizer, configs, budget_rows, Path(scratch),
                       stream_selection=not return_scores and rule in RULES)
        chosen = select_rows(run, budget_rows, rule, config.selection_seed)
    selected_rows = [run.pool_row_ids[i] for i in chosen.tolist()]
    selected = pool.select(selected_rows)
    if "landmarks" in run.details:  # the share of landmarks among the selected rows, against their pool share
        run.details["landmarks"]["landmark_share_selected"] = float(run.output.landmark_mask[chosen].float().mean())
    run.details["seconds"]["total"] = time.perf_counter() - start
    if return_scores:
        return selected, run.score_table(selection=rule, budget=budget_rows, selected_pool_row_ids=selected_rows)
    return (selected, run.details) if return_details else selected


def _dataset_select_by_influence(self: Dataset, target, **kwargs):
    """`Dataset.select_by_influence(target, model=..., budget=..., method=..., **options)`: see
    `hf_influence.select_by_influence` (this dataset is the pool)."""
    return select_by_influence(self, target, **kwargs)


def register_dataset_method() -> None:
    """Add `datasets.Dataset.select_by_influence`, never overwriting an attribute that already exists."""
    existing = getattr(Dataset, "select_by_influence", None)
    if existing is None:
        Dataset.select_by_influence = _dataset_select_by_influence
    elif existing is not _dataset_select_by_influence:
        logger.warning("datasets.Dataset already has a select_by_influence attribute; hf_influence leaves it "
                       "alone (use hf_influence.select_by_influence).")
