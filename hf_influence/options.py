"""The options of a selection run, each defined once: SelectionConfig (what every method shares) and
NNCIFTConfig here, the stage configs beside the stage they configure (SHARED_CONFIG_TYPES), and each method's
own options in the config class it registers with (`register_method(config_cls=...)`, PEFT's pattern).
`split_options` routes flat keyword options (their names are unique across `config_types()`) to the run's
dataclasses, and refuses by name an option of a method the run does not use."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any

from .networks.encoders import DEFAULT_ENCODER
from .formatting import FormattingConfig
from .extraction.gradients import GradientConfig
from .extraction.jvp import JVPConfig
from .models import LoraSettings, kwargs_option, torch_dtype
from .optimizer_warmup import WarmupConfig
from .rds_embeddings import LM_POOLINGS
from .registry import METHODS, ORACLES
from .selection.rules import RULE_TABLE
from .validation import check_fields


@dataclass
class SelectionConfig:
    """The options of a `select_by_influence` run that every method shares: which method, which rule, the seed,
    how a model id loads, the work_dir and its stores, chunking and progress. A method's own options are in the
    config class it registers with (`METHODS[name].config_cls`, e.g. InfluenceDistillationConfig).

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
        # Types first, so that a YAML `chunk_rows: 4.7` or `null` is refused here, before any model pass, and not
        # as a raw TypeError after the warm-up.
        check_fields(self, integers={"chunk_rows": 1, "selection_seed": None},
                     choices={"method": tuple(METHODS), "selection": (None, *RULE_TABLE)})
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
                          "valuation model's own hidden states (pooled as lm_pooling says, after lm_blocks blocks; "
                          "a forward pass per row, and the model is needed again to select with the network). "
                          "Measured on the exact-ID oracle (README, NN-CIFT benchmark): Q4 Spearman 0.20 with "
                          'MiniLM, 0.53 with "lm", lm_pooling="last", lm_blocks=8, still cutting the cost by 0.84.'})
    lm_pooling: str = field(
        default="mean",
        metadata={"help": 'with encoder="lm": "mean" (position-weighted mean over the row\'s tokens, RDS+\'s) or '
                          '"last" (the hidden state at the row\'s last token). On the ID oracle "last" predicts '
                          "unseen rows and targets better (README, NN-CIFT benchmark)."})
    lm_blocks: int | None = field(
        default=None,
        metadata={"help": 'with encoder="lm": run only the first this many decoder blocks (then the final norm), '
                          "a cheaper encoder (a forward through 8 of SmolLM2's 30 blocks costs about 0.1 of a "
                          "gradient row); None: the whole model."})
    encoder_batch_size: int = field(default=64, metadata={"help": "rows per encoder call."})
    network_hidden_sizes: list[int] = field(
        default_factory=lambda: [100],
        metadata={"help": "hidden layer widths of the InfluenceNetwork."})
    network_interaction_rank: int = field(
        default=0,
        metadata={"help": "rank of the InfluenceNetwork's bilinear term (P e_i) . (Q e_j) added to the MLP; 0 for the "
                          "paper's MLP alone (see hf_influence.networks.network)."})
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
                                     "network_num_threads": 1, "nn_cift_seed": None, "lm_blocks": 1},
                     numbers={"block_fraction": (0, 1), "network_learning_rate": (0, None),
                              "evaluation_fraction": (None, 1)}, optional=("network_num_threads", "lm_blocks"),
                     choices={"lm_pooling": LM_POOLINGS})
        if self.evaluation_fraction < 0:
            raise ValueError(f"NNCIFTConfig.evaluation_fraction must be in [0, 1], got {self.evaluation_fraction}")
        if self.oracle not in ORACLES:  # registered by networks/oracles.py (register_oracle)
            raise ValueError(f"NNCIFTConfig.oracle must be one of {sorted(ORACLES)}, got {self.oracle!r}")
        if self.network_validation_split not in ("pairs", "held_out"):
            raise ValueError(f"NNCIFTConfig.network_validation_split must be 'pairs' or 'held_out', "
                             f"got {self.network_validation_split!r}")


def _is_peft_lora_config(value: Any) -> bool:
    from peft import LoraConfig

    return isinstance(value, LoraConfig)


# The configs of the stages every model-based method runs through, and the run's own: any method accepts them.
SHARED_CONFIG_TYPES = (SelectionConfig, FormattingConfig, GradientConfig, JVPConfig, WarmupConfig, LoraSettings)


def config_types() -> tuple[type, ...]:
    """Every option dataclass: the shared ones, then each registered method's own (each once)."""
    own = (spec.config_cls for spec in METHODS.values() if spec.config_cls is not None)
    return (*SHARED_CONFIG_TYPES, *dict.fromkeys(own))


def method_config_types(method: str, oracle: str | None = None) -> tuple[type, ...]:
    """The config dataclasses of method `method`'s own options: its registered config_cls and, for NN-CIFT
    (NNCIFTConfig) with a registered method as its oracle (`oracle`, None: NNCIFTConfig's default), that
    method's, which the oracle runs with. () for an unknown method (SelectionConfig refuses its name)."""
    spec = METHODS.get(method)
    if spec is None or spec.config_cls is None:
        return ()
    if spec.config_cls is not NNCIFTConfig:
        return (spec.config_cls,)
    inner = METHODS.get(oracle or NNCIFTConfig.oracle)
    return (NNCIFTConfig, *(() if inner is None or inner.config_cls is None else (inner.config_cls,)))


def _owners(types: Iterable[type]) -> dict[str, list[type]]:
    """{field name: the dataclasses that declare it}, an inherited field counted once, by its declaring class."""
    owners: dict[str, list[type]] = {}
    for config_type in types:
        for f in dataclasses.fields(config_type):
            declaring = next(c for c in reversed(config_type.__mro__) if f.name in vars(c).get("__annotations__", {}))
            if declaring not in owners.setdefault(f.name, []):
                owners[f.name].append(declaring)
    return owners


def refusal_message(names: list[str], method: str, oracle: str | None) -> str:
    """Why options `names` are refused in a run of `method`: another method's (naming which), or unknown (with
    the close matches)."""
    run = f"method {method!r}" + (f" with oracle {oracle!r}" if oracle is not None else "")
    every = _owners(config_types())
    lines = []
    for name in names:
        if name in every:
            users = [spec.name for spec in METHODS.values() if spec.config_cls is not None
                     and name in {f.name for f in dataclasses.fields(spec.config_cls)}]
            lines.append(f"{name!r} is an option of {', '.join(t.__name__ for t in every[name])} (method "
                         f"{' / '.join(users)}), which {run} does not read")
        else:
            close = difflib.get_close_matches(name, every, n=3)
            hint = " (did you mean " + " or ".join(
                f"{match!r} of {every[match][0].__name__}" for match in close) + "?)" if close else ""
            lines.append(f"unknown option {name!r}{hint}")
    return ("Refused option(s) for " + run + ": " + "; ".join(lines) + ". Each method's options are the fields of "
            "its config class and of the shared ones (" + ", ".join(t.__name__ for t in SHARED_CONFIG_TYPES) +
            "); `hf-influence select --method NAME --help` lists them.")


def split_options(options: dict[str, Any], base: dict[type, Any] | Iterable[Any] | None = None) -> dict[type, Any]:
    """Route keyword options to the config dataclasses of the run's method; returns {type: instance} for the
    shared configs (SHARED_CONFIG_TYPES) and the method's own (`method_config_types`).

    base: config instances ({type: instance}, or an iterable of instances such as [SelectionConfig(...),
        GradientConfig(...)]) whose fields are the defaults the keyword options override. A `peft.LoraConfig`
        (in base, or as the option `peft_config`, TRL's spelling) stands for its LoraSettings.

    Raises:
        TypeError: an option (or a base instance) of a method the run does not use, naming that method, or an
            option no config declares, with its close matches; a base that is not one instance per type.
    """
    if "peft_config" in options:
        options = dict(options)
        peft_config = options.pop("peft_config")
        if peft_config is not None:
            base = [*(base.values() if isinstance(base, dict) else base or []), peft_config]
    known = config_types()
    if base is not None and not isinstance(base, dict):
        instances, base = list(base), {}
        for instance in instances:
            if _is_peft_lora_config(instance):
                instance = LoraSettings.from_peft_config(instance)
            if type(instance) not in known:
                raise TypeError(f"configs takes instances of {', '.join(t.__name__ for t in known)}; got "
                                f"{type(instance).__name__}.")
            if type(instance) in base:
                raise TypeError(f"configs has two {type(instance).__name__} instances (a peft LoraConfig, also as "
                                f"'peft_config', counts as LoraSettings): pass one.")
            base[type(instance)] = instance
    configs = dict(base or {})
    if "seed" in options:  # GradientConfig.seed until it was renamed: it never was the selection's seed
        warnings.warn("the option `seed` is deprecated: it set the gradient projection's seed, not the selection's. "
                      "Pass projection_seed=... (the same meaning) or selection_seed=... (the selection).",
                      FutureWarning, stacklevel=3)
        options = {**{k: v for k, v in options.items() if k != "seed"}, "projection_seed": options["seed"]}
    # The run's method (and NN-CIFT's oracle) decides which method configs take options: read them first.
    selection = configs.get(SelectionConfig)
    method = options.get("method", selection.method if selection is not None else SelectionConfig.method)
    nn_cift = configs.get(NNCIFTConfig)
    uses_oracle = NNCIFTConfig in method_config_types(method)
    oracle = options.get("oracle", nn_cift.oracle if nn_cift is not None else NNCIFTConfig.oracle) if uses_oracle else None
    run_types = (*SHARED_CONFIG_TYPES, *method_config_types(method, oracle))
    owners = {f.name: config_type for config_type in run_types for f in dataclasses.fields(config_type)}
    refused = sorted(set(options) - set(owners))
    foreign = sorted(t.__name__ for t in configs if t not in run_types)
    if refused:
        raise TypeError(refusal_message(refused, method, oracle))
    if foreign:
        raise TypeError(f"configs has {', '.join(foreign)}: the options of another method; method {method!r} reads "
                        f"{', '.join(t.__name__ for t in run_types)}.")
    for config_type in run_types:
        mine = {name: value for name, value in options.items() if owners[name] is config_type}
        current = configs.get(config_type)
        if current is None:
            configs[config_type] = config_type(**mine)
        elif mine:
            configs[config_type] = dataclasses.replace(current, **mine)
    return configs
