"""The options of a selection run, each defined once: SelectionConfig and NNCIFTConfig here, the other
config dataclasses beside the stage they configure. `split_options` routes flat keyword options (their names
are unique across CONFIG_TYPES) to their dataclass."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any

from .encoders import DEFAULT_ENCODER
from .formatting import FormattingConfig
from .gradients import GradientConfig
from .hessian import HESSIAN_KINDS
from .jvp import JVPConfig
from .models import LoraSettings, kwargs_option, torch_dtype
from .optimizer_warmup import WarmupConfig
from .registry import METHODS, ORACLES
from .selection import RULE_TABLE
from .validation import check_fields, is_int, is_number

LANDMARK_FEATURES = ("jvp", "lm", "jvp+lm", "truncated_gradient")


@dataclass
class SelectionConfig:
    """How `select_by_influence` scores and selects.

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "selection (SelectionConfig)"

    method: str = field(
        default="influence_distillation",
        metadata={"help": 'registered method: "influence_distillation" (landmarks), '
                          '"influence_distillation_exact" (gradients of every pool row), "less", "rds" (RDS+ '
                          'embeddings), "nn_cift" (an oracle distilled into an InfluenceNetwork, see '
                          'NNCIFTConfig) or "random".'})
    selection: str | None = field(
        default=None,
        metadata={"help": '"round_robin" (each target sample in turn takes its best remaining row), '
                          '"round_robin_task" (the same over target tasks), "mean_top_k", "less" (mean within '
                          'task, max over tasks), "facility_location" (lazy greedy coverage of the targets, as '
                          'DELIFT; in memory), "weighted" (sample rows with probability proportional to the '
                          "robust weights); None: the method's default."})
    target_task_column: str | None = field(
        default=None,
        metadata={"help": "target column naming each row's task (for \"round_robin_task\" and \"less\"); None uses "
                          '"task" when the target has it, else every target row is its own task.'})
    optimizer_state: str = field(
        default="warmup",
        metadata={"help": 'where the Adam state comes from when no optimizer object is passed: "warmup" (a short '
                          'LoRA AdamW run on a slice of the pool) or "gd" (plain gradient descent, no '
                          "preconditioning)."})
    num_landmarks: int = field(
        default=4096,
        metadata={"help": "landmark rows with exact gradients (capped at the pool size)."})
    landmark_selection: str = field(
        default="uniform",
        metadata={"help": '"uniform" (seeded random) or "kmeans++" on the regression features.'})
    landmark_features: str = field(
        default="jvp",
        metadata={"help": 'what the kernel regression reads for every pool row: "jvp" (JVP embeddings, '
                          "JVPConfig), \"lm\" (the base model's RDS+ embeddings: position-weighted mean of the last"
                          ' hidden state, one forward pass of the whole model), "jvp+lm" (both, each scaled by'
                          " its median pairwise distance so that both weigh the same in the kernel; held in "
                          'memory, [n, e_jvp + hidden]) or "truncated_gradient" (the run\'s per-sample gradient, '
                          "preconditioned and projected, of the model cut after JVPConfig.num_blocks blocks: the "
                          "same truncated model as the JVP features, a backward pass instead of a forward-mode one)."})
    landmark_scores: str = field(
        default="loo",
        metadata={"help": 'what landmark rows are ranked by when there are fewer landmarks than pool rows: "loo" '
                          "(their leave-one-out predictions, made from the other landmarks: every row is then an "
                          'out-of-sample prediction on the same footing) or "exact" (their exact influence, which'
                          " beats the ridge-shrunk predictions of the other rows and fills round-robin selections"
                          " with landmarks). With landmarks = the whole pool both give exact influence."})
    shortlist_factor: float | None = field(
        default=None,
        metadata={"help": "first-order landmark runs with a budget: the regression shortlists the shortlist_factor x"
                          " budget rows it ranks highest (under the selection rule), those rows get exact gradients"
                          " too and are scored exactly before the rule selects (an exact re-rank: the choice among "
                          "the likely rows is exact influence's). None: 4 for first-order runs with a budget, off "
                          "otherwise; 0: off (the paper's algorithm: the regression alone decides). "
                          "exact_gradient_fraction bounds it."})
    exact_gradient_fraction: float | None = field(
        default=0.14,
        metadata={"help": "the most exact gradients a landmark run takes, as a fraction of the pool rows: landmarks "
                          "+ shortlisted rows <= exact_gradient_fraction x n (the landmarks take at most a quarter of"
                          " it when the run shortlists, at least 16 rows). The pool side then costs about this "
                          "fraction plus the features' (JVP: 0.19 of a gradient row, measured) of exact influence's,"
                          " whatever the budget: 0.14 keeps it >= 3x cheaper. None: no bound (num_landmarks and "
                          "shortlist_factor as given; the shortlist grows with the budget)."})
    kernel: str = field(default="rbf", metadata={"help": 'kernel of the landmark regression: "rbf" or "linear".'})
    kernel_bandwidth: float | None = field(
        default=1.0,
        metadata={"help": "RBF bandwidth as a multiple of the median pairwise landmark distance (1.0, the "
                          "default, is the median heuristic); None chooses it by closed-form leave-one-out on the"
                          " landmarks (better in the fidelity lab, but an argmin over a grid: rounding "
                          "differences, e.g. a multi-process warm-up, can flip the choice and with it the "
                          "selection, so it is opt-in)."})
    kernel_ridge: float | None = field(
        default=0.01,
        metadata={"help": "ridge of the landmark regression, relative to the mean kernel diagonal (default 0.01);"
                          " None chooses it by closed-form leave-one-out on the landmarks (see kernel_bandwidth)."})
    order: int = field(
        default=1,
        metadata={"help": "1 (first-order influence) or 2 (adds the target-Hessian term to the robust weights)."})
    hessian: str = field(
        default="exact",
        metadata={"help": '"exact" (double backward) or "gauss_newton", for order 2.'})
    robust_lambda: float = field(
        default=0.02,
        metadata={"help": "lambda of the robust-weights objective (the paper's running example uses 0.02)."})
    step_size: float | None = field(
        default=None,
        metadata={"help": "eta of the one-step objective; None uses the optimizer's learning rate (required for "
                          'optimizer_state="gd" with order 2).'})
    selection_seed: int = field(
        default=0,
        metadata={"help": "seed of landmarks, selection order and random baselines."})
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "when `model` is a Hub id or folder: how to load it, as TRL's SFTConfig.model_init_kwargs: "
                          'keyword arguments of AutoModelForCausalLM.from_pretrained ("dtype": "bfloat16" / '
                          '"float32" / "auto", "revision", "attn_implementation", "device_map", '
                          '"trust_remote_code", ...) and "device" ("cuda", "cpu"; not with "device_map"); a JSON '
                          "string on the command line. Without it an id loads in float32 on the CPU."})
    work_dir: str | None = field(
        default=None,
        metadata={"help": "folder for the resumable stores (embeddings, gradients) and the saved warm-up; None "
                          "uses a temporary folder. Re-running with the same folder resumes after a crash and "
                          "reuses finished stores; target gradients are stored per target, so other targets on "
                          "the same pool and model share the pool-side stores and the warm-up."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace what work_dir holds for another model, pool, target or settings (stores, the "
                          "saved warm-up) instead of refusing it. The default refuses, before that stage's work, "
                          "so that nothing paid for is lost by mistake."})
    chunk_rows: int = field(
        default=65536,
        metadata={"help": "pool rows per chunk when streaming regression and scoring."})
    show_progress: bool = field(
        default=True,
        metadata={"help": "progress bars of the run's stages (formatting, passes over the rows); the warm-up has "
                          "its own, warmup_show_progress. transformers.utils.logging.disable_progress_bar() "
                          "silences them all."})

    def __post_init__(self) -> None:
        choices = {
            "method": tuple(METHODS), "selection": (None, *RULE_TABLE), "optimizer_state": ("warmup", "gd"),
            "landmark_selection": ("uniform", "kmeans++"), "landmark_features": LANDMARK_FEATURES,
            "landmark_scores": ("loo", "exact"),
            "kernel": ("rbf", "linear"), "order": (1, 2),
            "hessian": HESSIAN_KINDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SelectionConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        # Types first, so that a YAML `num_landmarks: 4.7` or `null` is refused here, before any model pass, and
        # not as a raw TypeError after the warm-up.
        for name in ("num_landmarks", "chunk_rows", "selection_seed"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"SelectionConfig.{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("kernel_ridge", "kernel_bandwidth", "shortlist_factor", "exact_gradient_fraction"):
            value = getattr(self, name)
            if value is not None and not (is_number(value) and math.isfinite(value)):
                raise ValueError(f"SelectionConfig.{name} must be a finite number or None, got {value!r}")
        for name in ("num_landmarks", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelectionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_ridge is not None and self.kernel_ridge < 0:
            raise ValueError(f"SelectionConfig.kernel_ridge must be >= 0 (or None: chosen by leave-one-out), got "
                             f"{self.kernel_ridge}")
        if self.kernel_bandwidth is not None and not self.kernel_bandwidth > 0:
            raise ValueError(f"SelectionConfig.kernel_bandwidth must be > 0 (a multiple of the median distance, or "
                             f"None: chosen by leave-one-out), got {self.kernel_bandwidth}")
        if self.shortlist_factor is not None and not self.shortlist_factor >= 0:
            raise ValueError(f"SelectionConfig.shortlist_factor must be >= 0 (0: off; None: 4 for first-order runs "
                             f"with a budget), got {self.shortlist_factor}")
        if self.exact_gradient_fraction is not None and not 0 < self.exact_gradient_fraction <= 1:
            raise ValueError(f"SelectionConfig.exact_gradient_fraction must be in (0, 1] (or None: no bound), got "
                             f"{self.exact_gradient_fraction}")
        if self.shortlist_factor and self.order == 2:
            raise ValueError("shortlist_factor > 0 with order=2: the shortlist refines first-order scores only (the "
                             "second-order term of shortlisted rows is not computed). Pass shortlist_factor=0 (or "
                             "leave it None) with order=2.")
        if not self.robust_lambda > 0:
            raise ValueError(f"SelectionConfig.robust_lambda must be > 0, got {self.robust_lambda}")
        self.model_init_kwargs = kwargs_option(self.model_init_kwargs, "SelectionConfig.model_init_kwargs")
        if self.model_init_kwargs is not None:
            check_model_init_kwargs(self.model_init_kwargs, "SelectionConfig.model_init_kwargs")


def check_model_init_kwargs(kwargs: dict, name: str) -> None:
    """Refuse, in one line naming `name`, the model_init_kwargs that loading would trip over late: a dtype that
    is neither a torch dtype nor "auto", a legacy `torch_dtype` beside `dtype`, `device` with `device_map`."""
    dtype = kwargs.get("dtype")
    if dtype is not None and dtype != "auto":
        try:
            torch_dtype(dtype)
        except ValueError:
            raise ValueError(f"{name}['dtype'] must name a torch dtype (e.g. 'bfloat16') or be 'auto', "
                             f"got {dtype!r}") from None
    if "torch_dtype" in kwargs:
        raise ValueError(f"{name} has 'torch_dtype', transformers' old name of 'dtype': pass 'dtype'.")
    if kwargs.get("device") is not None and kwargs.get("device_map") is not None:
        raise ValueError(f"{name} has both 'device' and 'device_map': give one (device_map places the model "
                         f"while loading, device moves it after).")


@dataclass
class NNCIFTConfig:
    """NN-CIFT: which oracle to distil, on how large a block, into which network.

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "NN-CIFT (NNCIFTConfig)"

    oracle: str = field(
        default="influence_distillation_exact",
        metadata={"help": '"influence_distillation_exact" (first-order ID, default), "influence_distillation", '
                          '"less", "rds", "delift" (in-context utility with the valuation model), "delift_se" '
                          '(embedding cosine) or "selectit" (pointwise self-rating). It also sets the default '
                          'selection rule, that of its paper: facility_location for delift and delift_se, less for less, '
                          'mean_top_k (top-k) for selectit, round_robin otherwise.'})
    select_unseen_only: bool = field(
        default=False,
        metadata={"help": "select only among the pool rows the oracle did not score (the paper's Q4 rows); False "
                          "keeps the block's rows, whose scores are the oracle's own, selectable."})
    block_fraction: float = field(
        default=0.05,
        metadata={"help": "u, the share of pool rows and of target columns the oracle scores (0.05 in the paper, "
                          "i.e. a quarter of a percent of the pairs)."})
    min_block_rows: int = field(
        default=32,
        metadata={"help": "lower bound on the block's pool rows (a network cannot learn from a handful)."})
    encoder: str = field(
        default=DEFAULT_ENCODER,
        metadata={"help": 'sentence-transformers encoder of the rows\' text (Hub id or folder), or "lm": the '
                          "valuation model's own position-weighted mean of its last hidden states (RDS+'s "
                          "representation; a forward pass per row, and the model is needed again to select with "
                          "the network). Measured on the ID oracle: twice MiniLM's Q4 Spearman (README)."})
    encoder_batch_size: int = field(default=64, metadata={"help": "rows per encoder call."})
    network_hidden_sizes: list[int] = field(
        default_factory=lambda: [100],
        metadata={"help": "hidden layer widths of the InfluenceNetwork."})
    network_interaction_rank: int = field(
        default=0,
        metadata={"help": "rank of the InfluenceNetwork's bilinear term (P e_i) . (Q e_j) added to the MLP; 0 for the "
                          "paper's MLP alone (see hf_influence.network)."})
    network_label_normalization: str = field(
        default="global",
        metadata={"help": '"global" (min-max over the block: predictions in oracle units, the paper) or "column" '
                          "(each target column standardised over the block rows first: predictions in per-target "
                          "standard units)."})
    network_epochs: int = field(default=20, metadata={"help": "maximum training epochs."})
    network_learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate."})
    network_batch_size: int = field(default=64, metadata={"help": "pairs per training step."})
    network_patience: int = field(
        default=3,
        metadata={"help": "epochs without validation improvement before early stopping."})
    network_validation_split: str = field(
        default="pairs",
        metadata={"help": "\"pairs\" (random validation pairs, the paper's regime) or \"held_out\" (whole held-out "
                          "rows and columns of the block, so early stopping tracks generalisation to unseen rows "
                          "and targets; needs a block large enough to spare them)."})
    network_num_threads: int | None = field(
        default=1,
        metadata={"help": "torch CPU threads while the network trains (1 is fastest for its many small ops on a "
                          "CPU; None leaves torch's process-wide setting alone). Prediction runs in fixed pool "
                          "blocks on one thread (`streaming.predict_scores`), the same blocks a streamed "
                          "selection uses."})
    nn_cift_seed: int = field(default=0, metadata={"help": "seed of the block and of the network."})
    evaluation_fraction: float = field(
        default=0.0,
        metadata={"help": "if > 0, the oracle also scores a fresh evaluation block (this share of the rows and of"
                          " the columns, plus the training block's), and the network is evaluated on its "
                          "quadrants Q1..Q4 (costs extra oracle calls; the figures go into the network's metrics "
                          "and card)."})

    def __post_init__(self) -> None:
        check_fields(self, integers={"min_block_rows": 1, "encoder_batch_size": 1, "network_interaction_rank": 0,
                                     "network_epochs": 1, "network_batch_size": 1, "network_patience": 0,
                                     "network_num_threads": 1, "nn_cift_seed": None},
                     numbers={"block_fraction": (0, 1), "network_learning_rate": (0, None),
                              "evaluation_fraction": (None, 1)}, optional=("network_num_threads",))
        if self.evaluation_fraction < 0:
            raise ValueError(f"NNCIFTConfig.evaluation_fraction must be in [0, 1], got {self.evaluation_fraction}")
        if self.oracle not in ORACLES:  # registered by oracles.py (register_oracle)
            raise ValueError(f"NNCIFTConfig.oracle must be one of {sorted(ORACLES)}, got {self.oracle!r}")
        if self.network_validation_split not in ("pairs", "held_out"):
            raise ValueError(f"NNCIFTConfig.network_validation_split must be 'pairs' or 'held_out', "
                             f"got {self.network_validation_split!r}")


def _is_peft_lora_config(value: Any) -> bool:
    from peft import LoraConfig

    return isinstance(value, LoraConfig)


CONFIG_TYPES = (SelectionConfig, FormattingConfig, GradientConfig, JVPConfig, WarmupConfig, LoraSettings, NNCIFTConfig)


def split_options(options: dict[str, Any], base: dict[type, Any] | Iterable[Any] | None = None) -> dict[type, Any]:
    """Route keyword options to the config dataclass that declares them; returns {type: instance}.

    base: config instances ({type: instance}, or an iterable of instances such as [SelectionConfig(...),
        GradientConfig(...)]) whose fields are the defaults the keyword options override. A `peft.LoraConfig`
        (in base, or as the option `peft_config`, TRL's spelling) stands for its LoraSettings.

    Raises:
        TypeError: an option no config declares (the message lists the close matches' dataclasses), or a base
            that is not one config instance per CONFIG_TYPES type.
    """
    if "peft_config" in options:
        options = dict(options)
        peft_config = options.pop("peft_config")
        if peft_config is not None:
            base = [*(base.values() if isinstance(base, dict) else base or []), peft_config]
    if base is not None and not isinstance(base, dict):
        instances, base = list(base), {}
        for instance in instances:
            if _is_peft_lora_config(instance):
                instance = LoraSettings.from_peft_config(instance)
            if type(instance) not in CONFIG_TYPES:
                raise TypeError(f"configs takes instances of {', '.join(t.__name__ for t in CONFIG_TYPES)}; got "
                                f"{type(instance).__name__}.")
            if type(instance) in base:
                raise TypeError(f"configs has two {type(instance).__name__} instances (a peft LoraConfig, also as 'peft_config', counts as LoraSettings): pass one.")
            base[type(instance)] = instance
    configs = dict(base or {})
    if "seed" in options:  # GradientConfig.seed until it was renamed: it never was the selection's seed
        warnings.warn("the option `seed` is deprecated: it set the gradient projection's seed, not the selection's. "
                      "Pass projection_seed=... (the same meaning) or selection_seed=... (the selection).",
                      FutureWarning, stacklevel=3)
        options = {**{k: v for k, v in options.items() if k != "seed"}, "projection_seed": options["seed"]}
    owners = {f.name: config_type for config_type in CONFIG_TYPES for f in dataclasses.fields(config_type)}
    unknown = sorted(set(options) - set(owners))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown}. Options are the fields of "
                        f"{', '.join(t.__name__ for t in CONFIG_TYPES)}; each field has its help "
                        f"(`hf-influence select --help` lists them).")
    for config_type in CONFIG_TYPES:
        mine = {name: value for name, value in options.items() if owners[name] is config_type}
        current = configs.get(config_type)
        if current is None:
            configs[config_type] = config_type(**mine)
        elif mine:
            configs[config_type] = dataclasses.replace(current, **mine)
    return configs
