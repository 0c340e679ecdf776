"""`InfluenceSFTConfig`: TRL's `SFTConfig` with the influence_* fields of `InfluenceSFTTrainer` (TRL keeps a
trainer's config in a module beside it, as `sft_config.py` beside `sft_trainer.py`), and the selection options a
trainer run passes to `select_by_influence`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import is_torch_bf16_gpu_available
from trl import SFTConfig

from .options import split_options
from .selection.rules import parse_budget

MODES = ("select", "weight", "online")
NORMALIZATIONS = ("sample", "token")


@dataclass
class InfluenceSFTConfig(SFTConfig):
    """`trl.SFTConfig` plus how the training rows are chosen or weighted by influence.

    Every SFTConfig / TrainingArguments field keeps its meaning. The fields added here:

    Attributes:
        influence_mode: "select" (train on the selected rows only), "weight" (train on the whole pool with
            per-sample loss weights) or "online" (re-select every influence_reselect_steps steps).
        influence_budget: rows to select in select and online modes: an int count, or a pool share, a float in
            (0, 1]. A float > 1 with no fractional part (as a command line gives "100") counts rows.
        influence_method: a registered method of `select_by_influence` ("influence_distillation", "less",
            "rds", "nn_cift", ...). Weight mode needs a method with robust weights (the Influence Distillation
            ones).
        influence_score_table: local folder or Hub dataset repo id of a ScoreTable to select or weight from,
            with no model pass; None computes scores from the trainer's model and `target_dataset`.
        influence_score_table_config: config name of a Hub score table (`push_score_table(config_name=...)`).
        influence_reselect_steps: online mode: optimizer steps between re-selections (each from the current
            model and optimizer state). The rows trained between two selections are
            influence_reselect_steps x per_device_train_batch_size x gradient_accumulation_steps x processes;
            the budget must not exceed that, and a smaller selection is cycled through.
        influence_options: keyword options of `select_by_influence` / `compute_scores` (fields of the shared
            configs SelectionConfig, FormattingConfig, GradientConfig, JVPConfig, WarmupConfig, LoraSettings and of
            influence_method's own config, e.g. {"num_landmarks": 1024, "selection": "round_robin"} for
            influence_distillation), or their JSON; another method's option is refused by name.
            selection_seed defaults to `seed`; progress bars follow `disable_tqdm`.
        influence_row_id_column: pool column of integer row ids (the ids a score table's `pool_row_id`
            refers to). When the pool has no such column it is created with each row's position.
        influence_weight_column: weight mode: pool column of non-negative loss weights. Used as the weights
            when neither target_dataset nor a score table is given; otherwise the trainer writes it.
        influence_loss_normalization: weight mode: "sample" (weighted mean over the step's samples of each
            sample's mean token loss) or "token" (each label token weighted by its sample's weight, divided by
            the step's label tokens; unit weights then give exactly SFTTrainer's loss).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["influence_options"]

    influence_mode: str = field(
        default="select",
        metadata={"help": "select (train on the selected rows), weight (per-sample loss weights on the whole pool) "
                          "or online (re-select every influence_reselect_steps steps).", "choices": list(MODES)},
    )
    influence_budget: float | str = field(
        default=0.05,
        metadata={"help": "Rows to select: an integer count, or a pool share (float in (0, 1])."},
    )
    influence_method: str = field(
        default="influence_distillation",
        metadata={"help": "Registered selection method (influence_distillation, influence_distillation_exact, less, "
                          "rds, nn_cift, random)."},
    )
    influence_score_table: str | None = field(
        default=None,
        metadata={"help": "Local folder or Hub dataset repo id of a score table (no model pass)."},
    )
    influence_score_table_config: str = field(
        default="default", metadata={"help": "Config name of a score table on the Hub."}
    )
    influence_reselect_steps: int | None = field(
        default=None, metadata={"help": "Online mode: optimizer steps between re-selections."}
    )
    influence_options: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Options of select_by_influence as a JSON object, e.g. '{\"num_landmarks\": 1024}'."},
    )
    influence_row_id_column: str = field(
        default="row_id", metadata={"help": "Pool column of integer row ids (created from positions if missing)."}
    )
    influence_allow_stale_table: bool = field(
        default=False,
        metadata={"help": "Use a score table even when train_dataset's rows at the table's pool_row_ids are not the "
                          "rows it scored (reordered, filtered or edited since); by default that is refused."},
    )
    influence_weight_column: str = field(
        default="weight", metadata={"help": "Weight mode: pool column of per-sample loss weights."}
    )
    influence_loss_normalization: str = field(
        default="sample",
        metadata={"help": "Weight mode: sample (weighted mean of per-sample mean token losses) or token.",
                  "choices": list(NORMALIZATIONS)},
    )

    def __post_init__(self) -> None:
        # TRL turns an unset bf16 on, which transformers then refuses on a machine without a bf16 accelerator:
        # unset, it follows the machine here (an explicit bf16=True is still the user's, and still refused there).
        if self.bf16 is None and not self.fp16 and (self.use_cpu or not is_torch_bf16_gpu_available()):
            self.bf16 = False
        super().__post_init__()
        if self.influence_mode not in MODES:
            raise ValueError(f"influence_mode must be one of {list(MODES)}, got {self.influence_mode!r}.")
        if self.influence_loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"influence_loss_normalization must be one of {list(NORMALIZATIONS)}, "
                             f"got {self.influence_loss_normalization!r}.")
        self.influence_budget = parse_budget(self.influence_budget, "influence_budget")
        self.influence_options = dict(self.influence_options or {})
        for reserved, instead in (("method", "influence_method"), ("budget", "influence_budget")):
            if reserved in self.influence_options:
                raise ValueError(f"influence_options must not set {reserved!r}: use {instead}.")
        if "max_length" in self.influence_options:
            warnings.warn("influence_options['max_length'] is deprecated: rows are scored at SFTConfig.max_length, "
                          "the length they train at; drop it from influence_options (it still wins for now).",
                          FutureWarning, stacklevel=3)
        # Builds the option dataclasses once: unknown names (TypeError) and bad values fail here, not after a
        # model pass.
        split_options({**self.influence_options, "method": self.influence_method})
        online = self.influence_mode == "online"
        steps = self.influence_reselect_steps
        if online and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"influence_mode='online' needs influence_reselect_steps, an integer >= 1 (optimizer "
                             f"steps between re-selections); got {steps!r}.")
        if not online and steps is not None:
            raise ValueError(f"influence_reselect_steps={steps} is only used by influence_mode='online' "
                             f"(influence_mode is {self.influence_mode!r}).")
        if online and self.influence_score_table is not None:
            raise ValueError("influence_mode='online' re-selects from the current model, which a fixed score table "
                             "cannot do: pass target_dataset to the trainer instead of influence_score_table.")
        for name in ("influence_row_id_column", "influence_weight_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty column name, got {getattr(self, name)!r}.")
        if self.influence_row_id_column == self.influence_weight_column:
            raise ValueError("influence_row_id_column and influence_weight_column must be different columns.")
        if self.influence_mode in ("weight", "online"):
            for name in ("packing", "padding_free"):
                if getattr(self, name):
                    raise ValueError(
                        f"{name}=True cannot be combined with influence_mode={self.influence_mode!r}: it merges rows "
                        f"into one sequence, losing the per-sample identity that "
                        f"{'the loss weights' if self.influence_mode == 'weight' else 'online re-selection'} needs. "
                        f"Set {name}=False, or use influence_mode='select', which selects before TRL packs.")
        if self.influence_mode == "weight":
            if self.loss_type != "nll":
                raise ValueError(f"influence_mode='weight' weights the negative log-likelihood: loss_type must be "
                                 f"'nll', got {self.loss_type!r}.")
            if self.label_smoothing_factor > 0:
                raise ValueError("influence_mode='weight' does not support label_smoothing_factor > 0 (that loss is "
                                 "computed from full logits, outside the weighted per-token path).")


def selection_options(args: InfluenceSFTConfig) -> dict[str, Any]:
    """The select_by_influence options of a trainer run: influence_options, with the selection seed, the progress
    bars and the row length taken from the SFT run's own settings unless influence_options sets them."""
    options = dict(args.influence_options)
    options.setdefault("selection_seed", args.seed)
    # The selection's bars follow the SFT run's; the warm-up stays silent unless warmup_show_progress asks.
    options.setdefault("show_progress", not args.disable_tqdm)
    if args.max_length is not None:
        options.setdefault("max_length", args.max_length)  # rows are scored as long as they are trained
    return options
