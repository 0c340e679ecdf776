"""The three influence modes of `InfluenceSFTTrainer`, one small strategy object each: what the mode checks
before any work, does before and after SFTTrainer is built, adds to each batch, and reports. The trainer asks
its mode instead of comparing `influence_mode` names (`MODE_STRATEGIES[args.influence_mode]`).

- SelectMode: select before SFTTrainer is built, so TRL's constructor prepares only the selected rows.
- WeightMode: train on the whole pool with per-sample loss weights (a column the collator carries).
- OnlineMode: re-select from the current model and the trainer's AdamW state between passes of a sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch.utils.data import Sampler

from .models import torch_dtype
from .selection.rules import SelectionError
from .trainer_config import InfluenceSFTConfig, selection_options
from .verbosity import get_logger

logger = get_logger(__name__)


class SelectionSampler(Sampler[int]):
    """Dataset positions of the current selection, `rows_per_pass` per pass (one pass = one training epoch).

    `positions()` is called once at the start of every pass, i.e. when the trainer begins an epoch, after the
    previous epoch's last optimizer step; the pass then yields those positions in a seeded random order,
    cycling through them when there are fewer than `rows_per_pass`.
    """

    def __init__(self, positions: Callable[[], Sequence[int]], rows_per_pass: int, seed: int):
        self.positions, self.rows_per_pass, self.seed = positions, rows_per_pass, seed
        self.passes = 0

    def __len__(self) -> int:
        return self.rows_per_pass

    def __iter__(self):
        chosen = list(self.positions())
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        order = torch.randperm(len(chosen), generator=generator).tolist()
        for k in range(self.rows_per_pass):
            yield chosen[order[k % len(chosen)]]


class InfluenceMode:
    """What a mode does at each point of the trainer's life (`trainer`: the InfluenceSFTTrainer, whose services,
    such as `_select`, the modes call). The defaults are the select / online ones."""

    name = ""
    budgeted = True  # selects influence_budget rows (weight mode trains on every row it has a weight for)
    weighted_loss = False  # the loss weights each sample by its weight column

    def check(self, args: InfluenceSFTConfig, pool: Dataset, target, table, kwargs: dict[str, Any]) -> None:
        """Refuse, before any work, a trainer this mode cannot run (a missing source of scores or weights)."""
        if target is None and table is None:
            raise ValueError(f"influence_mode={self.name!r} needs target_dataset (rows of the task to improve) or a "
                             f"score table (influence_score_table): neither was given.")

    def before_init(self, trainer, args: InfluenceSFTConfig, model, processing_class,
                    train_dataset: Dataset, kwargs: dict[str, Any]) -> tuple[Any, Any, Dataset]:
        """Before SFTTrainer is built (`trainer.args` is not set yet): the model, tokenizer and rows it is built
        with."""
        return model, processing_class, train_dataset

    def after_init(self, trainer) -> None:
        """After SFTTrainer is built: the mode's first selection or weights, recorded on the trainer."""

    def per_sample_columns(self, args: InfluenceSFTConfig) -> dict[str, torch.dtype]:
        """Pool columns, besides the row id, that the collator carries into each batch."""
        return {}

    def training_rows(self, trainer) -> int:
        """The rows the run trains on, for the summary and the model card."""
        return len(trainer.influence_selections[-1].row_ids)


class SelectMode(InfluenceMode):
    """Select before SFTTrainer is built, so that TRL's constructor prepares (tokenises, packs) only the selected
    rows, in selection order. A model id is loaded here, once, as TRL would: SFTTrainer then trains the object
    that scored."""

    name = "select"

    def before_init(self, trainer, args, model, processing_class, train_dataset, kwargs):
        quantization = kwargs.pop("quantization_config", None) if isinstance(model, str) else None
        model, processing_class = selection_model(model, processing_class, args, quantization)
        self.selection = trainer._select(None, args, model, processing_class, kwargs.get("peft_config"))
        position = {row_id: i for i, row_id in enumerate(trainer._influence_row_ids)}
        return model, processing_class, train_dataset.select([position[row_id] for row_id in self.selection.row_ids])

    def after_init(self, trainer):
        selected_ids, prepared = self.selection.row_ids, trainer.train_dataset
        if len(prepared) == 0:
            raise ValueError(f"TRL's preparation dropped all {len(selected_ids)} selected rows (no trainable token "
                             f"left, e.g. fully masked by assistant_only_loss or truncation to max_length="
                             f"{trainer.args.max_length}): check those settings against the selected rows "
                             f"{selected_ids[:10]}{'...' if len(selected_ids) > 10 else ''}.")
        if not trainer.args.packing and len(prepared) < len(selected_ids):
            logger.warning("TRL's preparation dropped %d of the %d selected rows (no trainable token left); "
                           "training on the other %d.", len(selected_ids) - len(prepared), len(selected_ids),
                           len(prepared))
        self.selection.statistics["influence/selected_rows"] = float(self.training_rows(trainer))

    def training_rows(self, trainer):
        column = trainer.args.influence_row_id_column
        if column in trainer.train_dataset.column_names:
            return len(set(trainer.train_dataset[column]))
        return trainer._influence_budget  # packed: rows are merged, TRL only drops rows with no label token


class WeightMode(InfluenceMode):
    """Train on the whole pool with per-sample loss weights: robust weights of a score table or of the target,
    or a weight column of the pool."""

    name = "weight"
    budgeted = False
    weighted_loss = True

    def check(self, args, pool, target, table, kwargs):
        column = args.influence_weight_column
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("influence_mode='weight' computes its own weighted loss: compute_loss_func must be None.")
        if target is None and table is None and column not in pool.column_names:
            raise ValueError(
                f"influence_mode='weight' needs weights: pass target_dataset (robust weights are computed), a score "
                f"table with weights (influence_score_table), or a pool column {column!r} "
                f"(influence_weight_column); the pool has columns {pool.column_names}.")
        if (target is not None or table is not None) and column in pool.column_names:
            raise ValueError(f"The pool already has a column {column!r} but the weights come from the "
                             f"{'target' if table is None else 'score table'}: rename that column or set "
                             f"influence_weight_column to a free name.")

    def before_init(self, trainer, args, model, processing_class, train_dataset, kwargs):
        trainer.loss_is_scaled_for_ga = True  # divided by the whole step's count, see get_batch_samples
        return model, processing_class, train_dataset

    def after_init(self, trainer):
        trainer._attach_weights()

    def per_sample_columns(self, args):
        return {args.influence_weight_column: torch.float32}


class OnlineMode(InfluenceMode):
    """Re-select every influence_reselect_steps optimizer steps from the current model and the trainer's own
    AdamW state; a sampler yields exactly the selected rows between re-selections."""

    name = "online"

    def after_init(self, trainer):
        args = trainer.args
        if not is_peft_model(trainer.model):
            raise ValueError("influence_mode='online' re-scores with the trainer's AdamW state on LoRA parameters: "
                             "train a PEFT model (pass peft_config=LoraConfig(...) or a PeftModel).")
        rows_per_pass = (args.influence_reselect_steps * trainer._train_batch_size
                         * args.gradient_accumulation_steps * max(1, args.world_size))
        if trainer._influence_budget > rows_per_pass:
            raise ValueError(
                f"influence_budget ({trainer._influence_budget} rows) is larger than the {rows_per_pass} rows trained "
                f"between re-selections (influence_reselect_steps x per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes): lower the budget or raise influence_reselect_steps.")
        self._reselect(trainer, None)
        trainer._influence_sampler = SelectionSampler(lambda: self._positions(trainer), rows_per_pass, seed=args.seed)

    @staticmethod
    def _reselect(trainer, optimizer):
        """A round: each scores with other adapter weights and optimizer state, so it gets stores of its own
        (work_dir/step-N), and a restarted run resumes the round it was in."""
        step = trainer.state.global_step
        selection = trainer._select(optimizer, trainer.args, trainer.model, trainer._tokenizer,
                                    work_subdir=f"step-{step}")
        selection.statistics["influence/round"] = float(len(trainer.influence_selections) - 1)
        return selection

    def _positions(self, trainer) -> list[int]:
        """Positions (in the prepared pool) of the rows to train on until the next re-selection."""
        last = trainer.influence_selections[-1]
        if trainer.state.global_step != last.step:
            gd = selection_options(trainer.args).get("optimizer_state") in ("gd", "warmup_gd")
            # The torch optimizer inside accelerate's AcceleratedOptimizer wrapper.
            last = self._reselect(trainer, None if gd else getattr(trainer.optimizer, "optimizer", trainer.optimizer))
            trainer._influence_logs.update(last.statistics)
        position = {row_id: i for i, row_id in enumerate(trainer.train_dataset[trainer.args.influence_row_id_column])}
        positions = [position[row_id] for row_id in last.row_ids if row_id in position]
        if len(positions) < len(last.row_ids):
            logger.warning("%d selected rows were dropped by TRL's preparation (no label token left) and are not "
                           "trained on.", len(last.row_ids) - len(positions))
        if not positions:
            raise SelectionError("None of the selected rows survived TRL's dataset preparation: nothing to train on.")
        return positions


# One per InfluenceSFTConfig mode (trainer_config.MODES; a test checks that they are the same).
MODE_STRATEGIES: dict[str, type[InfluenceMode]] = {mode.name: mode for mode in (SelectMode, WeightMode, OnlineMode)}


def selection_model(model, processing_class, args: InfluenceSFTConfig, quantization_config=None):
    """Select mode's model and tokenizer, on the device the trainer will train on (`args.device`; a model placed
    by device_map or quantization stays where it is). A model id is loaded as SFTTrainer loads one: `args.model_init_kwargs`,
    float32 unless they name a dtype, `args.trust_remote_code`, the trainer's quantization_config, and no
    device_map under multi-GPU DDP; its tokenizer at the same revision."""
    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, str):
        name = model
        kwargs = {"dtype": "float32", "trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if PartialState().distributed_type in (DistributedType.MULTI_GPU, DistributedType.DEEPSPEED):
            kwargs["device_map"] = None  # as TRL: DDP places the model itself ("auto" fails)
        if isinstance(kwargs["dtype"], str) and kwargs["dtype"] != "auto":
            kwargs["dtype"] = torch_dtype(kwargs["dtype"])
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        processing_class = processing_class or AutoTokenizer.from_pretrained(
            name, revision=kwargs.get("revision"), trust_remote_code=kwargs["trust_remote_code"])
    if getattr(model, "hf_device_map", None) is None and not getattr(model, "is_quantized", False):
        model.to(args.device)
    return model, processing_class
