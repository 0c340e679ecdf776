"""The run of one method: options routed, rows formatted, the model prepared (and given back as it was), the
registered method called, its scores and provenance collected (`compute_scores`), and rows selected from them
(`select_rows`). `select_by_influence` (influence.py) is the facade over this; the methods live in `methods/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from torch import Tensor, nn

from .data import load_rows
from .extraction.distributed import process_state
from .formatting import FormattingConfig, format_dataset
from .locks import work_dir_lock
from .models import (DEFAULT_MODEL, LoraSettings, add_lora, load_model, memoized_weights_digests, model_identity,
                     weights_digest)
from .options import SelectionConfig, split_options
from .registry import METHODS, MethodSpec
from .artifacts.scores import ScoreTable, provenance_record, rows_digest
from .selection.rules import SelectionError, choose_rows
from .extraction.store import fingerprint_dataset
from .selection.streaming import ScoreStream
from .verbosity import get_logger

logger = get_logger(__name__)


@dataclass
class Context:
    """What a method gets: the model, the formatted rows and every config."""

    model: nn.Module
    tokenizer: Any
    pool: Dataset  # formatted pool rows (row_id = index into the user's pool)
    target: Dataset  # formatted target rows
    configs: dict[type, Any]
    optimizer: torch.optim.Optimizer | None
    work_dir: Path
    raw_pool: Dataset | None = None  # the user's pool rows behind `pool` (same order), for text-based methods
    raw_target: Dataset | None = None
    budget_rows: int | None = None  # rows the run will select (None: scores only, compute_scores)
    rule: str | None = None  # the selection rule the run will apply (the method's default when none is given)
    target_tasks: list | None = None  # [m] task of each target row, for the per-task rules
    seconds: dict = field(default_factory=dict)  # stage -> wall seconds, filled by `timed`
    # Set by select_by_influence when no score table is asked for and the rule streams: a method may then
    # return a ScoreStream instead of the [n, m] matrix.
    stream_selection: bool = False

    @property
    def config(self) -> SelectionConfig:
        """The options every method shares."""
        return self.configs[SelectionConfig]

    @property
    def method_config(self) -> Any:
        """The method's own options (its registered config_cls, e.g. InfluenceDistillationConfig)."""
        return self.configs[METHODS[self.config.method].config_cls]

    @property
    def show_progress(self) -> bool:
        return self.config.show_progress

    def timed(self, name: str):
        return _Timer(self.seconds, name)


class _Timer:
    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.record[self.name] = self.record.get(self.name, 0.0) + time.perf_counter() - self.start


@dataclass
class MethodOutput:
    """scores [n, m] over the formatted pool rows (None when streamed); weights [n]; landmark_mask [n];
    selectable: [n] bool, the rows the rule may pick (None: every row; never with a stream);
    stream: the scores as a ScoreStream (only when Context.stream_selection); pointwise: scores [n, 1] that
    do not depend on the target (a pointwise NN-CIFT oracle); details: what the method reports about its run
    (e.g. landmark diagnostics), recorded in the score table's provenance."""

    scores: Tensor | None
    weights: Tensor | None = None
    landmark_mask: Tensor | None = None
    stream: ScoreStream | None = None
    pointwise: bool = False
    details: dict = field(default_factory=dict)
    selectable: Tensor | None = None


def prepare_model(model, tokenizer, configs) -> tuple[nn.Module, Any, Callable[[], None]]:
    """Load or wrap the model with LoRA; returns (model, tokenizer, restore) where restore() undoes our changes
    to a user's model (LoRA weights trained by the warm-up, or the adapter we added)."""
    lora = configs[LoraSettings]
    init = configs[SelectionConfig].model_init_kwargs
    if model is None or isinstance(model, str):
        try:
            loaded, loaded_tokenizer = load_model(model or DEFAULT_MODEL, **(init or {}))
        except TypeError as error:  # a key from_pretrained does not take (transformers names it)
            raise ValueError(f"SelectionConfig.model_init_kwargs: from_pretrained refused {sorted(init or {})}: "
                             f"{error}") from None
        return add_lora(loaded, lora), tokenizer or loaded_tokenizer, lambda: None
    if init:
        raise ValueError("model_init_kwargs says how to load a model id, but model is an object: load it with those "
                         "settings yourself, or pass the id.")
    if tokenizer is None:
        raise ValueError("tokenizer=... is required when model is a model object (pass its tokenizer).")
    if hasattr(model, "peft_config"):
        snapshot = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

        def restore():
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in snapshot:
                        parameter.copy_(snapshot[name])

        return model, tokenizer, restore
    # add_lora freezes the base weights and unload() leaves them frozen: put the user's flags back, or a full
    # fine-tune after selection would silently train nothing.
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    wrapped = add_lora(model, lora)

    def restore():
        wrapped.unload()
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)

    return wrapped, tokenizer, restore


@contextlib.contextmanager
def _without_input_require_grads(model: nn.Module | None):
    """Remove transformers' input-require-grads hooks for the block, then put them back.

    Trainers add them for gradient checkpointing with adapters (`enable_input_require_grads`); they call
    requires_grad_() on the embedding output, which functorch's jvp (JVP embeddings) refuses, and our passes
    need no gradient flowing into the inputs.
    """
    hooked = [module for module in (model.modules() if model is not None else ())
              if getattr(module, "_require_grads_hooks", None)]
    for module in hooked:
        module.disable_input_require_grads()
    try:
        yield
    finally:
        for module in hooked:
            module.enable_input_require_grads()


def _target_tasks(target: Dataset, formatted_target: Dataset, column: str | None) -> list[str] | None:
    if column is None and "task" in target.column_names:
        column = "task"
    if column is None:
        return None
    if column not in target.column_names:
        raise ValueError(f"target_task_column={column!r} is not a target column; columns: {target.column_names}")
    values = target[column]
    return [str(values[row]) for row in formatted_target["row_id"]]


def _target_names(target: Dataset, formatted_target: Dataset) -> list[str]:
    ids = target["id"] if "id" in target.column_names else None
    names = [str(ids[row]) if ids is not None else f"target/{row}" for row in formatted_target["row_id"]]
    return names if len(set(names)) == len(names) else [f"target/{row}" for row in formatted_target["row_id"]]


def as_dataset(rows, name: str) -> Dataset:
    """`rows` (a Dataset, a list of row dicts, or a file / folder / Hub id) as a non-empty Dataset; anything else
    is a one-line SelectionError naming `name` ("pool", "target") and what to pass instead."""
    if isinstance(rows, DatasetDict):
        raise SelectionError(f"The {name} is a DatasetDict with splits {list(rows)}: pass one split, e.g. "
                             f"rows[{next(iter(rows), 'train')!r}].")
    if isinstance(rows, (IterableDataset, IterableDatasetDict)):
        raise SelectionError(f"The {name} is a streamed {type(rows).__name__}: selection needs the row count and "
                             f"random access. Load it without streaming=True, or take rows into a Dataset "
                             f"(Dataset.from_list(list(rows.take(n)))).")
    if isinstance(rows, Dataset):
        dataset = rows
    elif isinstance(rows, list):
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise SelectionError(f"The {name}'s row {bad} is a {type(rows[bad]).__name__}, not a dict of columns.")
        try:
            dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({})
        except UnicodeEncodeError:  # a lone surrogate (e.g. from a bad decode): Arrow stores UTF-8 only
            row, column = next((i, key) for i, row in enumerate(rows) for key, value in row.items()
                               if not _encodes(value))
            raise SelectionError(f"The {name}'s row {row}, column {column!r}, holds text that is not valid Unicode "
                                 f"(a lone surrogate, often from decoding bytes with errors='surrogateescape'): "
                                 f"clean it before selection.") from None
    elif isinstance(rows, (str, os.PathLike)):
        dataset = load_rows(rows)
    else:
        raise SelectionError(f"The {name} must be a datasets.Dataset, a list of row dicts, or a file, folder or Hub "
                             f"dataset id; got {type(rows).__name__}.")
    if len(dataset) == 0:
        raise SelectionError(f"The {name} is empty: it needs at least one row.")
    return dataset


def _encodes(value) -> bool:
    """Whether every string inside `value` (nested lists and dicts too) encodes as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def select_rows(run: ScoreRun, budget_rows: int, rule: str, seed: int) -> Tensor:
    """Positions (into run.pool_row_ids) of the `budget_rows` rows `rule` picks, in selection order."""
    output = run.output
    with _Timer(run.details.setdefault("seconds", {}), "selection"):
        return choose_rows(budget_rows, rule, seed, scores=output.scores, weights=output.weights, stream=output.stream,
                           target_groups=run.target_tasks, selectable=output.selectable)


@dataclass
class ScoreRun:
    """The scores of one method run, before selection.

    Attributes:
        output: the method's scores [n, m] over the usable pool rows, weights [n], landmark mask [n].
        pool_row_ids: [n] the pool row (index into the given pool) of each score row.
        target_names: [m] target sample ids.
        target_tasks: [m] task of each target column (None when the target has no task column).
        skipped: {pool row: reason} for pool rows formatting could not use.
        configs: every config used.
        provenance: model id and revision, method, configs, fingerprints, skipped rows.
        details: stage timings ("seconds") and method details (e.g. num_landmarks).
    """

    output: MethodOutput
    pool_row_ids: list[int]
    target_names: list[str]
    target_tasks: list[str] | None
    skipped: dict
    configs: dict
    provenance: dict
    details: dict

    def score_table(self, **provenance: Any) -> ScoreTable:
        """The ScoreTable of this run, with extra provenance fields (e.g. the selection)."""
        # The task of each target column: the LESS and round_robin_task rules group by it, and a table selected
        # from later (the trainer, a pulled Hub table) must pick the same rows as this run did.
        tasks = None if self.target_tasks is None else dict(zip(self.target_names, self.target_tasks))
        record = provenance_record(**self.provenance, **provenance, target_tasks=tasks, details=self.details)
        return ScoreTable.from_matrix(self.output.scores, self.pool_row_ids, self.target_names,
                                      weights=self.output.weights, landmark_mask=self.output.landmark_mask,
                                      provenance=record)


def compute_scores(pool: Dataset | list[dict] | str, target: Dataset | list[dict] | str,
                   model: str | nn.Module | None = None, method: str | None = None, tokenizer=None,
                   optimizer: torch.optim.Optimizer | None = None, configs=None, **options: Any) -> ScoreRun:
    """Run a method's scoring without selecting: the arguments of `select_by_influence` without budget
    (`configs`: config dataclass instances as defaults, keyword options override them).

    Returns:
        ScoreRun; `run.output.scores` is [usable pool rows, target rows] (`run.pool_row_ids` maps rows back).
    """
    if method is not None:
        options["method"] = method
    with tempfile.TemporaryDirectory(prefix="hf_influence_") as scratch:
        return compute(as_dataset(pool, "pool"), target, model, tokenizer, optimizer, split_options(options, configs),
                       None, Path(scratch))


def duplicate_pool_rows(pool: Dataset) -> dict[str, Any]:
    """Pool rows that repeat an earlier row: by `id` and by content (every other column), with counts and the
    first (earlier row, repeat) pair of each; {} when there are none. A repeated row can be selected twice."""
    found = {}
    columns = [name for name in pool.column_names if name != "id"]
    for kind, values in (("id", pool["id"] if "id" in pool.column_names else None),
                         ("content", None if not columns else [json.dumps(row, sort_keys=True, default=str)
                                                               for row in pool.select_columns(columns).to_list()])):
        if values is None:
            continue
        first, repeats = {}, []
        for index, value in enumerate(values):
            if value in first:
                repeats.append((first[value], index))
            else:
                first[value] = index
        if repeats:
            found[kind] = {"repeated_rows": len(repeats), "first": list(repeats[0])}
    return found


@memoized_weights_digests()  # the base weights do not change during a run: hash them once
def compute(pool: Dataset, target, model, tokenizer, optimizer, configs: dict, budget_rows: int | None,
             scratch: Path, stream_selection: bool = False) -> ScoreRun:
    """Score with the configured method; stores go to work_dir, else to `scratch` (a folder the caller removes
    once it no longer needs them: a ScoreStream reads its embeddings from there)."""
    config = configs[SelectionConfig]
    target = as_dataset(target, "target")
    spec = METHODS[config.method]
    duplicates = duplicate_pool_rows(pool)
    for kind, found in duplicates.items():  # said before any model pass; kept in the provenance
        logger.warning("%d pool rows repeat an earlier row's %s (the first: row %d repeats row %d); a repeated row "
                       "can be selected more than once.", found["repeated_rows"], kind, found["first"][1],
                       found["first"][0])
    # The passes run in eval mode; the caller's model gets its own train/eval flags back, module by module.
    modes = [(module, module.training) for module in model.modules()] if isinstance(model, nn.Module) else []
    if spec.needs_model:
        model, tokenizer, restore = prepare_model(model, tokenizer, configs)
    else:
        model, restore = None, lambda: None
    try:
        with _without_input_require_grads(model):
            output, context, pool_row_ids, target_names, tasks, skipped = _run_method(
                spec, pool, target, model, tokenizer, optimizer, budget_rows, configs, scratch, stream_selection)
    finally:
        restore()
        for module, training in modes:
            module.training = training
    if output.pointwise:  # one score per pool row, whatever the target: one column, no target tasks
        target_names, tasks = ["pointwise"], None
    model_id, revision = model_identity(model) if model is not None else (None, None)
    provenance = {
        "model_id": model_id, "model_revision": revision,
        "model_weights_digest": weights_digest(model) if model is not None else None, "method": config.method,
        "configs": {config_type.__name__: asdict(value) for config_type, value in configs.items()},
        "pool_fingerprint": fingerprint_dataset(pool), "target_fingerprint": fingerprint_dataset(target),
        "skipped_pool_rows": {str(row): reason for row, reason in skipped.items()},
        "duplicate_pool_rows": duplicates,
        "pool_rows_digest": rows_digest(pool, pool_row_ids),
    }
    return ScoreRun(output, pool_row_ids, target_names, tasks, skipped, configs, provenance,
                    {"seconds": context.seconds, **output.details})


def _check_token_ids(formatted: Dataset, model: nn.Module, tokenizer, name: str) -> None:
    """Refuse, before any model pass, rows whose token ids the model has no embedding for: a tokenizer that is
    not the model's (the pass would fail deep in an embedding lookup, after the Trainer has aligned the model's
    special tokens with it)."""
    rows = model.get_input_embeddings().num_embeddings
    largest = pc.max(pc.list_flatten(formatted.data.column("input_ids"))).as_py()
    if largest is not None and largest >= rows:
        row, token = next((row_id, max(ids)) for row_id, ids in zip(formatted["row_id"], formatted["input_ids"])
                          if max(ids) >= rows)
        raise ValueError(f"The tokenizer does not fit the model: {name} row {row} has token id {token}, and the "
                         f"model's input embedding has {rows} rows ({type(tokenizer).__name__} with "
                         f"{len(tokenizer)} tokens). Pass the tokenizer saved with the model.")


def _run_method(spec: MethodSpec, pool, target, model, tokenizer, optimizer, budget_rows, configs, scratch: Path,
                stream_selection: bool):
    """Format the rows and run the method: (output, context, pool row ids, target names, target tasks, skipped)."""
    config = configs[SelectionConfig]
    if model is None:  # a method without a model ("random") scores the raw rows
        context = Context(None, None, pool, target, configs, None, Path())
        output = spec.function(context)
        return output, context, list(range(len(pool))), ["random"], None, {}
    formatted_pool = format_dataset(pool, tokenizer, configs[FormattingConfig], show_progress=config.show_progress)
    formatted_target = format_dataset(target, tokenizer, configs[FormattingConfig], show_progress=config.show_progress)
    if formatted_target.skipped:
        raise ValueError(f"Target rows cannot be scored (row: reason): {formatted_target.skipped}. Fix or remove "
                         "them: a target row without label tokens has no loss and no gradient.")
    for name, formatted in (("pool", formatted_pool.dataset), ("target", formatted_target.dataset)):
        _check_token_ids(formatted, model, tokenizer, name)
    # Skipped pool rows were warned about once, by format_dataset; the provenance lists them.
    usable = len(formatted_pool.dataset)
    if budget_rows is not None and budget_rows > usable:
        raise SelectionError(f"budget {budget_rows} is larger than the {usable} usable pool rows "
                             f"({len(formatted_pool.skipped)} of {len(pool)} were skipped by formatting).")
    # Methods that extract into stores need one folder shared by all processes.
    if config.work_dir is None and process_state() is not None and spec.uses_stores:
        raise ValueError("work_dir must be set when selecting under a multi-process launch: every process needs the "
                         "same store folder (a temporary folder would differ per process). Pass work_dir=... on a "
                         "file system all processes share.")
    tasks = _target_tasks(target, formatted_target.dataset, config.target_task_column)
    context = Context(model, tokenizer, formatted_pool.dataset, formatted_target.dataset, configs, optimizer,
                      Path(config.work_dir or scratch), raw_pool=pool.select(formatted_pool.dataset["row_id"]),
                      raw_target=target, budget_rows=budget_rows, rule=config.selection or spec.selection_rule(configs),
                      target_tasks=tasks, stream_selection=stream_selection)
    # One run at a time per work_dir: a second run started on it would write its warm-up and stores over this one's.
    with work_dir_lock(config.work_dir) if config.work_dir is not None else contextlib.nullcontext():
        output = spec.function(context)
    if formatted_pool.truncated:  # format_dataset warned; the provenance keeps the count per kind of cut
        kinds = list(formatted_pool.truncated.values())
        output.details["truncated_pool_rows"] = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    return (output, context, formatted_pool.dataset["row_id"], _target_names(target, formatted_target.dataset),
            tasks, formatted_pool.skipped)
