"""`InfluenceSFTTrainer`: TRL's `SFTTrainer` that selects or weights its training rows by influence.

    args = InfluenceSFTConfig(output_dir="out", influence_mode="select", influence_budget=0.05)
    trainer = InfluenceSFTTrainer(model, args=args, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer, peft_config=LoraConfig(...))
    trainer.train()

Modes (`InfluenceSFTConfig.influence_mode`):

- "select": before SFTTrainer is built, score the pool (`select_by_influence` with the model and tokenizer the
  trainer is given, a model id loaded once as TRL loads it, its `peft_config` as the scoring adapter, on the
  device it will train on; or a given `ScoreTable` with no model pass), then build SFTTrainer on
  `pool.select(selected)` and that model: TRL prepares just those rows through its public constructor, so
  packing and padding-free work as in a plain SFTTrainer.
- "weight": train on the whole pool with per-sample loss weights w_i: the Influence Distillation robust
  weights (from a ScoreTable or `compute_scores`), or a weight column of the pool.
- "online": re-select every `influence_reselect_steps` optimizer steps from the current model and the
  trainer's own AdamW state; a sampler yields exactly the selected rows between re-selections.

Per-sample identity: every pool row carries a row id column (created as the row's position when the pool
has none; that is what a ScoreTable made by `select_by_influence(pool, ...)` refers to) and, in weight mode,
a weight column. Both survive TRL's preparation (its maps keep extra columns), `remove_unused_columns`
(they join the signature columns) and the collator (a wrapper moves them into the batch as tensors);
`compute_loss` takes them out before the model sees the batch.

Weighted loss, for an optimizer step over the micro-batches of all processes (S = its samples, T = its label
tokens, l_i = mean token cross-entropy of sample i over its t_i label tokens, s_i = t_i l_i their sum):

    "sample" normalisation:  L = (1/|S|) sum_{i in S} w_i l_i
    "token" normalisation:   L = (1/|T|) sum_{i in S} w_i s_i       (w = 1: exactly SFTTrainer's loss)

The divisor counts the whole step, not the micro-batch (the trainer's `num_items_in_batch`, counted here
in samples or tokens), so L and its gradient do not depend on how the step is split into micro-batches.
Weights are rescaled to mean 1 over the training rows: "sample" then estimates the robust-weights objective
sum_i w_i l_i / sum_i w_i without bias, and a step of zero-weight rows gives a zero loss rather than 0 / 0.

Multi-process (`accelerate launch`): every rank runs the same selection with the same seed (`selection_seed`
defaults to the trainer's `seed`; collective steps such as the warm-up run on every rank), then rank 0's
result is broadcast, so float differences between devices can never split the ranks' data.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch import Tensor
from torch.utils.data import Sampler
from trl import SFTTrainer

from .artifacts.cards import HUB_TAG
from .engine import compute_scores
from .influence import select_by_influence
from .models import looks_like_local_path
from .registry import METHODS
from .artifacts.scores import ScoreTable, json_safe, provenance_record, rows_digest
from .selection.rules import GROUPED_RULES, SelectionError, choose_rows, resolve_budget
from .extraction.store import atomic_write_bytes
from .trainer_config import InfluenceSFTConfig, selection_options
from .trainer_modes import MODE_STRATEGIES
from .validation import is_int
from .verbosity import get_logger

logger = get_logger(__name__)

IGNORE_INDEX = -100


@dataclass
class InfluenceSelection:
    """One selection made by InfluenceSFTTrainer (kept in `trainer.influence_selections`).

    Attributes:
        step: optimizer steps already taken when it was made (0: before training).
        row_ids: selected pool row ids in selection order (select and online modes), or the ids of the
            weighted training rows (weight mode).
        weights: weight mode: float32 [len(row_ids)] loss weights, rescaled to mean 1; else None.
        source: "score_table", "target" (scored with the trainer's model) or "weight_column".
        provenance: how the scores were made: the score table's provenance record (empty for a weight column).
        statistics: the figures logged as `influence/<name>` (budget, rows, score quantiles, weights, seconds).
    """

    step: int
    row_ids: list[int]
    weights: Tensor | None
    source: str
    provenance: dict
    statistics: dict[str, float]


class PerSampleColumns:
    """Wraps a data collator: the named per-sample columns bypass it and join the batch as [B] tensors."""

    def __init__(self, collator: Callable, dtypes: dict[str, torch.dtype]):
        self.collator, self.dtypes = collator, dtypes

    def __call__(self, examples: list[dict]) -> dict:
        present = [name for name in self.dtypes if name in examples[0]]
        batch = self.collator([{k: v for k, v in example.items() if k not in self.dtypes} for example in examples])
        for name in present:
            batch[name] = torch.tensor([example[name] for example in examples], dtype=self.dtypes[name])
        return batch


class _ScaledLogProbs:
    """Calls the model and scales each row of the fused LM head's per-token log-probabilities by a factor.

    SFTTrainer.compute_loss reduces `-outputs.log_probs` [B, T-1] (zero off the labels) to a sum divided by
    num_items_in_batch; with row i scaled by its factor that sum is the weighted one, while TRL keeps its own
    metrics, normalisation and multi-process scaling.
    """

    def __init__(self, model: Callable, factors: Tensor):
        self.model, self.factors = model, factors

    def __call__(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        if kwargs.get("fused_lm_head"):
            outputs.log_probs = outputs.log_probs * self.factors.to(outputs.log_probs)[:, None]
        return outputs


class InfluenceSFTTrainer(SFTTrainer):
    """SFTTrainer that trains on influence-selected rows, with influence weights, or re-selecting online.

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs: as SFTTrainer
            (`peft_config`, `formatting_func`, `callbacks`, ...); `args` must be an InfluenceSFTConfig and
            `train_dataset` (the pool) a `datasets.Dataset`.
        target_dataset: rows of the task to improve (Dataset, list of dicts, file or Hub id, as
            `select_by_influence` takes), scored with the trainer's model and tokenizer.
        influence_score_table: a ScoreTable object to select or weight from, instead of a target.

    Attributes:
        influence_selections: every InfluenceSelection made, in order.

    Raises:
        TypeError: `args` is not an InfluenceSFTConfig, or the pool is not a `datasets.Dataset`.
        ValueError / SelectionError / ScoreTableError: a missing source (no target, score table or weight
            column), a budget larger than the pool, malformed row ids or weights (the message names the row),
            settings the mode cannot honour.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sft", HUB_TAG]
    _name = "Influence SFT"
    # TRL's convention: the card of a trained model names and cites the method's paper.
    _paper: ClassVar[dict[str, str]] = {
        "title": "Efficient Data Selection at Scale via Influence Distillation",
        "id": "2505.19051",
        "citation": textwrap.dedent("""\
            @article{nikdan2025influence,
                title        = {{Efficient Data Selection at Scale via Influence Distillation}},
                author       = {Mahdi Nikdan and Vincent Cohen-Addad and Dan Alistarh and Vahab Mirrokni},
                year         = 2025,
                eprint       = {arXiv:2505.19051},
            }"""),
    }

    def __init__(self, model, args: InfluenceSFTConfig | None = None, data_collator=None,
                 train_dataset: Dataset | None = None, eval_dataset=None, processing_class=None, *,
                 target_dataset=None, influence_score_table: ScoreTable | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = InfluenceSFTConfig(f"{str(name).split('/')[-1]}-InfluenceSFT")
        if not isinstance(args, InfluenceSFTConfig):
            raise TypeError(f"args must be an InfluenceSFTConfig (it adds the influence_* fields), "
                            f"got {type(args).__name__}.")
        if not isinstance(train_dataset, Dataset):
            raise TypeError(f"train_dataset (the pool) must be a datasets.Dataset, got {type(train_dataset).__name__}: "
                            f"selection needs the row count and random access.")
        mode = MODE_STRATEGIES[args.influence_mode]()
        table = _score_table(args, influence_score_table, target_dataset)
        mode.check(args, train_dataset, target_dataset, table, kwargs)
        row_ids = _pool_row_ids(train_dataset, args.influence_row_id_column)
        if table is not None and not args.influence_allow_stale_table:
            _check_table_content(table, train_dataset, row_ids)
        self._influence_mode = mode
        self._influence_budget = resolve_budget(args.influence_budget, len(row_ids)) if mode.budgeted else None
        self._influence_pool = train_dataset
        self._influence_row_ids = row_ids
        self._influence_target = target_dataset
        self._influence_table = table
        self._influence_logs: dict[str, float] = {}
        self._influence_sampler: Sampler[int] | None = None  # set by a mode that chooses the rows of each pass
        self.influence_selections: list[InfluenceSelection] = []
        if args.influence_row_id_column not in train_dataset.column_names:
            train_dataset = train_dataset.add_column(args.influence_row_id_column, row_ids)
        given = model
        model, processing_class, train_dataset = mode.before_init(self, args, model, processing_class, train_dataset,
                                                                  kwargs)
        init_kwargs = args.model_init_kwargs
        if isinstance(given, str) and not isinstance(model, str):  # loaded with them by the mode; SFTTrainer would
            args.model_init_kwargs = None  # warn that a model object ignores them
        try:
            super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)
        finally:
            args.model_init_kwargs = init_kwargs
        self.data_collator = PerSampleColumns(self.data_collator, {args.influence_row_id_column: torch.long,
                                                                   **mode.per_sample_columns(args)})
        mode.after_init(self)
        self._influence_logs.update(self.influence_selections[-1].statistics)

    # ------------------------------------------------------------------------------------------------
    # Data

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        columns = [self.args.influence_row_id_column, *self._influence_mode.per_sample_columns(self.args)]
        self._signature_columns += [column for column in columns if column not in self._signature_columns]

    def _get_train_sampler(self, train_dataset=None):
        if self._influence_sampler is not None:
            return self._influence_sampler
        return super()._get_train_sampler(train_dataset)

    # ------------------------------------------------------------------------------------------------
    # Selection

    def _select(self, optimizer, args: InfluenceSFTConfig, model, tokenizer, peft_config=None,
                work_subdir: str | None = None) -> InfluenceSelection:
        """Select `budget` pool rows (from the score table, or the target with `model`, to which a base model gets
        `peft_config` as its scoring adapter, keeping its stores in work_dir/work_subdir); records it. Called
        before SFTTrainer is built in select mode."""
        start = time.perf_counter()
        step = self.state.global_step if hasattr(self, "state") else 0
        budget = self._influence_budget
        if self._influence_table is not None:
            scores, table_ids, targets = self._influence_table.to_matrix()
            self._check_table_rows(table_ids, args.influence_row_id_column)
            if budget > len(table_ids):
                raise SelectionError(f"influence_budget {budget} is larger than the {len(table_ids)} pool rows the "
                                     f"score table covers.")
            provenance = self._influence_table.provenance
            # The rule the table's run selected with (recorded by select_by_influence and the CLI), else its
            # method's default.
            method = METHODS.get(provenance.get("method"))
            rule = (selection_options(args).get("selection") or provenance.get("selection")
                    or (method.selection_rule({}) if method else "round_robin"))
            chosen = choose_rows(budget, rule, selection_options(args)["selection_seed"], scores=scores,
                                 weights=lambda: self._table_weights(table_ids),
                                 target_groups=self._table_groups(rule, targets))
            selected = [table_ids[i] for i in chosen.tolist()]
            source, score_ids = "score_table", table_ids
        else:
            options = selection_options(args)
            if work_subdir is not None and options.get("work_dir"):
                options["work_dir"] = str(Path(options["work_dir"]) / work_subdir)
            if peft_config is not None and not is_peft_model(model) and "peft_config" not in options:
                options["peft_config"] = peft_config
            with _ScoringContext(model):
                _, table = select_by_influence(
                    self._influence_pool, self._influence_target, model=model, budget=budget,
                    method=args.influence_method, tokenizer=tokenizer, optimizer=optimizer,
                    return_scores=True, **options)
            selected = [self._influence_row_ids[p] for p in table.provenance["selected_pool_row_ids"]]
            scores, positions, _ = table.to_matrix()
            score_ids = [self._influence_row_ids[p] for p in positions]
            provenance, source = table.provenance, "target"
        selected = self._from_main_process(torch.tensor(selected, dtype=torch.long)).tolist()
        statistics = {"influence/budget": float(budget), "influence/pool_rows": float(len(self._influence_row_ids)),
                      **_score_statistics(scores, score_ids, selected),
                      "influence/selection_seconds": time.perf_counter() - start}
        selection = InfluenceSelection(step, selected, None, source, provenance, statistics)
        self.influence_selections.append(selection)
        return selection

    def _attach_weights(self) -> None:
        """Weight mode's weights (WeightMode): the weight column of the prepared pool, validated and rescaled to
        mean 1."""
        start = time.perf_counter()
        column, id_column = self.args.influence_weight_column, self.args.influence_row_id_column
        provenance: dict = {}
        if self._influence_table is not None:
            ids = self._influence_table.pool_row_ids
            self._check_table_rows(ids, self.args.influence_row_id_column)
            weights, source, provenance = self._table_weights(ids), "score_table", self._influence_table.provenance
        elif self._influence_target is not None:
            with _ScoringContext(self.model):
                run = compute_scores(self._influence_pool, self._influence_target, model=self.model,
                                     method=self.args.influence_method, tokenizer=self._tokenizer,
                                     **selection_options(self.args))
            if run.output.weights is None:
                raise ValueError(f"influence_method={self.args.influence_method!r} gives no per-sample weights; "
                                 f"influence_mode='weight' needs robust weights (influence_distillation or "
                                 f"influence_distillation_exact).")
            ids = [self._influence_row_ids[p] for p in run.pool_row_ids]
            weights, source = run.output.weights.double(), "target"
            provenance = provenance_record(**run.provenance, details=run.details)
        else:
            ids, source = self.train_dataset[id_column], "weight_column"
            weights = torch.tensor(self.train_dataset[column], dtype=torch.float64)
        _check_weights(weights, ids, f"{source} weights")
        weights = self._from_main_process(weights.double())
        by_id = dict(zip(ids, weights.tolist()))
        dataset = self.train_dataset
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        keep = [i for i, row_id in enumerate(dataset[id_column]) if row_id in by_id]
        if len(keep) < len(dataset):
            logger.warning("%d training rows have no weight (not in the score table, or skipped when scoring) and are "
                           "left out.", len(dataset) - len(keep))
            dataset = dataset.select(keep)
        training_ids = dataset[id_column]
        raw = torch.tensor([by_id[row_id] for row_id in training_ids], dtype=torch.float64)
        if not raw.sum() > 0:
            raise ValueError("Every training row has weight 0: there is nothing to train on.")
        normalised = (raw * (len(raw) / raw.sum())).float()
        self.train_dataset = dataset.add_column(column, normalised.tolist())
        statistics = {"influence/pool_rows": float(len(self._influence_row_ids)),
                      "influence/weighted_rows": float(len(raw)),
                      "influence/mean_weight": float(raw.mean()), "influence/max_weight": float(raw.max()),
                      "influence/zero_weight_share": float((raw == 0).double().mean()),
                      # Kish's effective sample size: how many equally weighted rows the weights are worth.
                      "influence/effective_rows": float(raw.sum() ** 2 / (raw**2).sum()),
                      "influence/selection_seconds": time.perf_counter() - start}
        self.influence_selections.append(
            InfluenceSelection(self.state.global_step, training_ids, normalised, source, provenance, statistics))

    def _table_weights(self, ids: list[int]) -> Tensor:
        weights = self._influence_table.weights.double()
        if torch.isnan(weights).all():
            method = self._influence_table.provenance.get("method")
            raise ValueError(f"The score table has no weights (method {method!r}): weights come from "
                             f"influence_distillation or influence_distillation_exact runs.")
        _check_weights(weights, ids, "score table weights")
        return weights

    def _table_groups(self, rule: str, targets: list[str]) -> list[str] | None:
        """The task of each target column, for the rules that group by it (recorded by the run that made the table)."""
        if rule not in GROUPED_RULES:
            return None
        tasks = self._influence_table.provenance.get("target_tasks")
        if not tasks:
            if rule == "round_robin_task":
                raise SelectionError("selection='round_robin_task' needs the target tasks, and this score table "
                                     "records none (made without a task column, or by an older version).")
            return None  # LESS without tasks: each target column is its own task, as in select_by_influence
        return [tasks[name] for name in targets]

    def _check_table_rows(self, table_ids: list[int], column: str) -> None:
        known = set(self._influence_row_ids)
        unknown = [row_id for row_id in table_ids if row_id not in known]
        if unknown:
            raise ValueError(f"The score table has pool_row_id {unknown[0]} ({len(unknown)} ids in all) that no pool "
                             f"row has in column {column!r}: the table was made for "
                             f"another pool, or set influence_row_id_column to the column its ids refer to.")

    @staticmethod
    def _from_main_process(values: Tensor) -> Tensor:
        """Rank 0's values on every rank (same shape everywhere); unchanged in a single process. Through
        PartialState, which holds before SFTTrainer is built (select mode selects then)."""
        state = PartialState()
        if state.num_processes == 1:
            return values
        from accelerate.utils import broadcast

        return broadcast(values.to(state.device), from_process=0).cpu()

    # ------------------------------------------------------------------------------------------------
    # Loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and, in weight mode, the step's sample or label-token count (all ranks)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self._influence_mode.weighted_loss or not batch_samples:
            return batch_samples, num_items_in_batch
        if self.args.influence_loss_normalization == "sample":
            count = sum(len(batch["labels"]) for batch in batch_samples)
        else:
            count = sum(int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()) for batch in batch_samples)
        count = torch.tensor(count, device=device)
        # As transformers counts tokens: over all ranks when average_tokens_across_devices, in which case
        # SFTTrainer.compute_loss multiplies the loss by the process count to undo DDP's averaging.
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batch_samples, count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(self.args.influence_row_id_column, None)
        weights = inputs.pop(self.args.influence_weight_column, None)
        if not self._influence_mode.weighted_loss or weights is None or not self.model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        factors = weights.float()
        if self.args.influence_loss_normalization == "sample":
            label_counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            factors = factors / label_counts
            if num_items_in_batch is None:  # called outside the training loop: this batch is the step
                num_items_in_batch = len(factors)
        return super().compute_loss(_ScaledLogProbs(model, factors), inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # ------------------------------------------------------------------------------------------------
    # Logs and model card

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Selection statistics join the next training log (train() resets the log history, so not earlier).
        if self._influence_logs and not any(key.startswith("eval_") for key in logs):
            logs = {**logs, **self._influence_logs}
            self._influence_logs = {}
        super().log(logs, start_time)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None):
        """TRL's model card, tagged `hf_influence`, with the selection's provenance (metadata and a section)."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        # TRL titles the card with model_name ("Model Card for None" without one): the output folder's name, as
        # transformers' Trainer names a model it pushes.
        model_name = model_name or Path(self.args.output_dir).name
        # TRL's usage snippet loads `hub_model_id`, which transformers sets only when pushing (else the card says
        # model="None"): until then, the repo the run will push to, or the folder the model is saved in.
        pushed_id = self.hub_model_id
        self.hub_model_id = pushed_id or self.args.hub_model_id or self.args.output_dir
        try:
            super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=[*tags, HUB_TAG])
        finally:
            self.hub_model_id = pushed_id
        if not self.is_world_process_zero():
            return
        from huggingface_hub import ModelCard

        path = Path(self.args.output_dir) / "README.md"
        card = ModelCard.load(path)
        _name_the_base_model(card, getattr(self.model.config, "hf_influence_model_id", None))
        if not self.influence_selections:
            atomic_write_bytes(path, str(card).encode("utf-8"))
            return
        summary = self.influence_summary()
        card.data.hf_influence = json_safe({key: value for key, value in summary.items()
                                            if key != "provenance" and value is not None})
        provenance = json.dumps(json_safe(summary["provenance"]), indent=2, sort_keys=True)
        card.text = card.text.rstrip("\n") + "\n\n" + _card_section(summary, provenance)
        atomic_write_bytes(path, str(card).encode("utf-8"))

    def influence_summary(self) -> dict[str, Any]:
        """How the training rows were chosen: mode, method, budget, rows, selection steps, and the provenance of
        the last selection's scores (JSON-able)."""
        last = self.influence_selections[-1]
        return {
            "mode": self.args.influence_mode,
            "method": last.provenance.get("method", self.args.influence_method if last.source == "target" else None),
            "source": last.source,
            "budget": self._influence_budget,
            "pool_rows": len(self._influence_row_ids),
            "training_rows": self._influence_mode.training_rows(self),
            "loss_normalization": (self.args.influence_loss_normalization
                                   if self._influence_mode.weighted_loss else None),
            "selection_steps": [selection.step for selection in self.influence_selections],
            "model_id": last.provenance.get("model_id"),
            "model_revision": last.provenance.get("model_revision"),
            "pool_fingerprint": last.provenance.get("pool_fingerprint"),
            "target_fingerprint": last.provenance.get("target_fingerprint"),
            "provenance": last.provenance,
        }


class _ScoringContext:
    """Eval mode (no dropout) around a model pass made for selection; afterwards the training mode and the
    random streams as they were. (The requires_grad flags of a model that got a LoRA adapter for the pass are
    restored by select_by_influence itself.)
    """

    def __init__(self, model):
        self.model = model
        device = next(model.parameters()).device
        self.devices = [device.index or 0] if device.type == "cuda" else []

    def __enter__(self):
        self.was_training = self.model.training
        self.rng = torch.random.fork_rng(devices=self.devices)
        self.rng.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.rng.__exit__(*exc)


def _name_the_base_model(card, model_id: str | None) -> None:
    """TRL links the base model only when the model was loaded from a Hub id, and writes "[None]" otherwise. A
    model that `load_model` loaded from a Hub id (the offline copy of the default model included) recorded the
    id: link it; a local folder is named as one."""
    missing = "[None](https://huggingface.co/None)"
    if card.data.base_model is None and model_id and not looks_like_local_path(model_id) and not Path(model_id).exists():
        card.data.base_model = model_id
        card.text = card.text.replace(missing, f"[{model_id}](https://huggingface.co/{model_id})")
    else:
        card.text = card.text.replace(missing, f"the local model `{model_id or 'unknown'}`")


def _score_table(args: InfluenceSFTConfig, table: ScoreTable | None, target) -> ScoreTable | None:
    """The ScoreTable object, or the one named by args.influence_score_table (local folder, else Hub)."""
    if table is not None and args.influence_score_table is not None:
        raise ValueError("Pass a score table either as influence_score_table=ScoreTable or in "
                         "InfluenceSFTConfig.influence_score_table, not both.")
    if table is not None and not isinstance(table, ScoreTable):
        raise TypeError(f"influence_score_table must be a ScoreTable, got {type(table).__name__}.")
    if table is None and args.influence_score_table is not None:
        location = args.influence_score_table
        if Path(location).exists():
            table = ScoreTable.load(location)
        else:
            from .artifacts.hub import load_score_table

            try:
                table = load_score_table(location, config_name=args.influence_score_table_config)
            except Exception as error:
                raise ValueError(f"influence_score_table={location!r} is not a local score-table folder and could not "
                                 f"be loaded from the Hub: {error}") from error
    if table is not None and target is not None:
        raise ValueError("Pass either target_dataset (scores computed with the trainer's model) or a score table, "
                         "not both.")
    return table


def _check_table_content(table: ScoreTable, pool: Dataset, row_ids: list[int]) -> None:
    """Refuse a score table whose scored rows are not the pool's rows at the same ids (compared by content, with
    the digest the table recorded; tables from before the digest are not checked)."""
    recorded = table.provenance.get("pool_rows_digest")
    if not recorded:
        return
    missing = [column for column in recorded["columns"] if column not in pool.column_names]
    position = {row_id: k for k, row_id in enumerate(row_ids)}
    table_ids = table.pool_row_ids
    if any(row_id not in position for row_id in table_ids):
        return  # ids the pool does not have: _check_table_rows names them when the trainer selects
    if missing:
        problem = f"it scored rows with columns {missing} that train_dataset lacks"
    elif rows_digest(pool, [position[row_id] for row_id in table_ids], recorded["columns"]) != recorded:
        problem = "train_dataset's rows at its pool_row_ids have other content than the rows it scored"
    else:
        return
    raise ValueError(f"The score table does not fit train_dataset: {problem} (the pool was reordered, filtered or "
                     f"edited since it was scored). Pass the pool it scored (ids in influence_row_id_column), score "
                     f"again, or set influence_allow_stale_table=True to use it anyway.")


def _pool_row_ids(pool: Dataset, column: str) -> list[int]:
    """The pool's row ids: its `column` (distinct ints), or positions when it has no such column."""
    if len(pool) == 0:
        raise ValueError("train_dataset (the pool) is empty.")
    if column not in pool.column_names:
        return list(range(len(pool)))
    ids = pool[column]
    for position, value in enumerate(ids):
        if not is_int(value):
            raise TypeError(f"Pool column {column!r} (influence_row_id_column) must hold integer row ids; row "
                            f"{position} has {value!r}. Rename the column or set influence_row_id_column.")
    seen: set[int] = set()
    for position, value in enumerate(ids):
        if value in seen:
            raise ValueError(f"Pool column {column!r} repeats row id {value} (at row {position}): row ids must be "
                             f"distinct.")
        seen.add(value)
    return [int(value) for value in ids]


def _check_weights(weights: Tensor, ids: Sequence[int], what: str) -> None:
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what.capitalize()} must be finite and >= 0: pool row id {ids[position]} has "
                         f"{float(weights[position])} ({int(bad.sum())} bad rows in all).")


def _score_statistics(scores: Tensor, score_ids: Sequence[int], selected: Sequence[int]) -> dict[str, float]:
    """Quantiles of each pool row's mean score over the targets, and the mean over the selected rows."""
    per_row = scores.double().mean(dim=1).numpy()
    quantiles = np.quantile(per_row, [0.05, 0.5, 0.95])
    index = {row_id: i for i, row_id in enumerate(score_ids)}
    chosen = per_row[[index[row_id] for row_id in selected if row_id in index]]
    return {"influence/selected_rows": float(len(selected)),
            "influence/score_q05": float(quantiles[0]), "influence/score_q50": float(quantiles[1]),
            "influence/score_q95": float(quantiles[2]),
            "influence/score_mean_selected": float(chosen.mean()) if len(chosen) else math.nan}


def _card_section(summary: dict[str, Any], provenance: str) -> str:
    rows = [("mode", summary["mode"]), ("method", summary["method"]), ("scores from", summary["source"]),
            ("budget (rows)", summary["budget"]), ("pool rows", summary["pool_rows"]),
            ("training rows", summary["training_rows"]), ("loss normalisation", summary["loss_normalization"]),
            ("selections at steps", summary["selection_steps"]), ("scoring model", summary["model_id"]),
            ("pool fingerprint", summary["pool_fingerprint"]), ("target fingerprint", summary["target_fingerprint"])]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value is not None)
    return (
        "## Training data selection (hf-influence)\n\n"
        "The training rows were chosen or weighted by influence with hf-influence's `InfluenceSFTTrainer`.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "<details><summary>Score provenance</summary>\n\n"
        f"```json\n{provenance}\n```\n\n</details>\n"
    )


__all__ = ["InfluenceSFTTrainer", "InfluenceSelection", "PerSampleColumns"]

