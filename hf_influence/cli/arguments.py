"""The command line's argument dataclasses and the parsing shared by every subcommand: flags from the dataclass
fields (TRL's `TrlParser`, an `HfArgumentParser`), `--config FILE.yaml` defaults that flags override, the model loader."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from trl import TrlParser

from ..data import load_rows
from ..extraction.distributed import process_state
from ..extraction.gradients import GradientConfig
from ..models import DEFAULT_MODEL, load_model
from ..selection.rules import SelectionError, parse_budget as parse_budget_value
from ..options import SHARED_CONFIG_TYPES, NNCIFTConfig, SelectionConfig, method_config_types, refusal_message


@dataclass
class ModelArguments:
    """Which model to load.

    Attributes:
        model: Hub id or local folder of a causal LM (the default falls back to an offline copy).
        revision: Hub revision.
        dtype: "float32", "bfloat16" or "float16".
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "model"

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local folder of a causal LM."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})


@dataclass
class DataArguments:
    """Input rows and output folder.

    Attributes:
        data: jsonl/json/parquet/csv file (optionally .gz), a folder of them, or a Hub dataset id.
        output: output folder (stores and the summary are written there).
        split: split of a Hub dataset.
        limit: use only the first `limit` rows.
        overwrite: replace stores made with another model, dataset or configuration.
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "data"

    data: str | None = field(default=None, metadata={"help": "jsonl/json/parquet/csv file, folder, or Hub dataset id."})
    output: str = field(default="runs/hf-influence", metadata={"help": "Output folder."})
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})

    def __post_init__(self):
        check_at_least(self, 1, "limit")
    overwrite: bool = field(default=False, metadata={"help": "Replace mismatched stores instead of refusing them."})


@dataclass
class PassArguments:
    """Options of a command that makes one pass over --data into a store (gradients, embed)."""

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "pass"

    show_progress: bool = field(default=True, metadata={"help": "Progress bars of formatting and of the pass."})


@dataclass
class DemoArguments:
    """The embedded demo: a generated multi-domain pool and a math target.

    Attributes:
        rows_per_domain: pool rows generated per domain (math, code, qa, classification).
        target_rows: math target rows.
        demo_budget: rows to select (int) or share of the pool (float in (0, 1]).
        output: output folder.
        data_seed: data seed.
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "demo"

    rows_per_domain: int = field(default=16, metadata={"help": "Pool rows per demo domain."})
    target_rows: int = field(default=8, metadata={"help": "Rows of the math target."})
    demo_budget: str = field(default="16", metadata={"help": "Rows (int) or pool share (float) to select."})
    output: str = field(default="runs/demo", metadata={"help": "Output folder."})
    data_seed: int = field(default=0, metadata={"help": "Data seed."})

    def __post_init__(self):
        check_at_least(self, 1, "rows_per_domain", "target_rows")


@dataclass
class SelectArguments:
    """Pool, target, budget and where the selection goes.

    Attributes:
        pool: candidate training rows: jsonl/json/parquet/csv file (optionally .gz), a folder, or a Hub dataset id.
        target: rows of the task to improve, same forms.
        budget: rows to select (an integer) or a share of the pool (a float in (0, 1]).
        output: output folder: selected.jsonl, scores/ (the score table), report.json.
        pool_split: split of a Hub pool dataset.
        target_split: split of a Hub target dataset.
        pool_limit: use only the first N pool rows.
        target_limit: use only the first N target rows.
        group_column: pool column summarised in the report (share of each value in the selection vs the pool).
        group_depth: group the column's values by their first N "/"-separated parts (Tulu sources such as
            "flan_v2/cot_gsm8k" group into "flan_v2" at depth 1); None keeps whole values.
        top: groups printed (by selected share; the rest summed in one line); report.json keeps them all.
        save_scores: write the score table (scores/, every pool row x target row). False streams the selection
            for first-order landmark Influence Distillation: neither the [n, m] scores nor the [n, e] embeddings
            are held, so memory does not grow with the pool (see README, "Streaming selection").
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "pool, target and output"

    pool: str | None = field(default=None, metadata={"help": "Pool file, folder or Hub dataset id."})
    target: str | None = field(default=None, metadata={"help": "Target file, folder or Hub dataset id."})
    budget: str = field(default="0.05", metadata={"help": "Rows (int) or pool share (float in (0, 1])."})
    output: str = field(default="runs/select", metadata={"help": "Output folder."})
    pool_split: str = field(default="train", metadata={"help": "Split of a Hub pool dataset."})
    target_split: str = field(default="test", metadata={"help": "Split of a Hub target dataset."})
    pool_limit: int | None = field(default=None, metadata={"help": "Use only the first N pool rows."})
    target_limit: int | None = field(default=None, metadata={"help": "Use only the first N target rows."})
    group_column: str = field(default="source", metadata={"help": "Pool column summarised in the report."})
    group_depth: int | None = field(
        default=None, metadata={"help": 'Group the column\'s values by their first N "/"-separated parts.'})
    top: int | None = field(default=20, metadata={"help": "Groups printed in the report (the rest summed)."})
    save_scores: bool = field(default=True, metadata={"help": "Write scores/ (False: streamed selection)."})

    def __post_init__(self):
        check_at_least(self, 1, "pool_limit", "target_limit", "group_depth")
        check_at_least(self, 0, "top")


@dataclass
class HubArguments:
    """An InfluenceNetwork or score table to load or push.

    Attributes:
        network: InfluenceNetwork folder (a fit-network output folder, or its network/ subfolder) or Hub repo id.
        scores: score-table folder (score tables are pushed with `--scores`).
        repo_id: Hub repo to push to (model repo for a network, dataset repo for a score table).
        config_name: config of the score table in its dataset repo (one per target set).
        private: create the repo private.
        license: the card's licence (a Hub licence id); None leaves it out.
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "network, score table and Hub"

    network: str | None = field(default=None, metadata={"help": "InfluenceNetwork folder or Hub repo id."})
    scores: str | None = field(default=None, metadata={"help": "Score-table folder."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repo to push to."})
    config_name: str = field(default="default", metadata={"help": "Config name of a pushed score table."})
    private: bool = field(default=False, metadata={"help": "Create a private repo."})
    license: str | None = field(
        default=None,
        metadata={"help": "licence of the card (a Hub licence id, e.g. apache-2.0). It follows the data and models "
                          "the scores come from, so it is yours to name; none leaves it out (a score table's repo "
                          "keeps the one it has)."})


@dataclass
class TrainDataArguments:
    """The pool to train on, the target to select for, and an optional held-out target to measure.

    Attributes:
        pool: training pool: jsonl/json/parquet/csv file (optionally .gz), a folder, or a Hub dataset id.
        pool_split: split of a Hub pool dataset.
        pool_sample: use a seeded random sample of N pool rows (sample_seed); None uses every row.
        target: target rows (file, folder or Hub id, any schema of hf_influence.targets); None with target_task
            reads that task's shared offline file under data_dir, else its Hub dataset.
        target_task: a task of hf_influence.targets.TARGET_TASKS (gsm8k, mmlu, bbh, tydiqa, squad, codex): names
            the target schema and its subtask column; None reads `target` as prompt/response rows.
        target_limit: use a seeded random sample of N target rows.
        eval_target: held-out rows of the task (same forms as target) whose loss is measured before and after
            training (the mean per-row response-token cross-entropy); None with eval_limit and target_task takes
            the task's held-out split (GSM8K test, MMLU test); None otherwise skips the measurement.
        eval_limit: use a seeded random sample of N held-out rows.
        data_dir: the shared offline data folder (holds targets/*.jsonl.gz), for target_task without target.
        sample_seed: seed of the samples (pool_sample, target_limit, eval_limit).
        use_lora: train a LoRA adapter (lora_* options) rather than every weight.
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "pool, target and held-out rows"

    pool: str | None = field(default=None, metadata={"help": "Pool file, folder or Hub dataset id."})
    pool_split: str = field(default="train", metadata={"help": "Split of a Hub pool dataset."})
    pool_sample: int | None = field(default=None, metadata={"help": "Seeded random sample of N pool rows."})
    target: str | None = field(default=None, metadata={"help": "Target file, folder or Hub dataset id."})
    target_task: str | None = field(default=None, metadata={"help": "gsm8k, mmlu, bbh, tydiqa, squad or codex."})
    target_limit: int | None = field(default=None, metadata={"help": "Seeded random sample of N target rows."})
    eval_target: str | None = field(default=None, metadata={"help": "Held-out target rows: loss before/after."})
    eval_limit: int | None = field(default=None, metadata={"help": "Seeded random sample of N held-out rows."})
    data_dir: str | None = field(default=None, metadata={"help": "Shared offline data folder (targets/)."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the pool / target samples."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (lora_* options)."})

    def __post_init__(self):
        check_at_least(self, 1, "pool_sample", "target_limit", "eval_limit")


def check_at_least(arguments, minimum: int, *names: str) -> None:
    """Refuse (naming the flag) an integer option below `minimum`; None (unset) passes."""
    for name in names:
        value = getattr(arguments, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name} must be at least {minimum}, got {value}.")


class CommandParser(TrlParser):
    """TRL's parser (the --config YAML merged under the flags, its `env:` mapping exported), refusing what TRL would
    pass on: a YAML key no option has ends the command with a one-line error naming the file; the deprecated key
    `seed` (GradientConfig's projection seed before the rename) still works, with a warning."""

    def __init__(self, dataclass_types, seed_alias: bool, refusal=None, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.seed_alias, self.config_path, self.config_keys, self.refusal = seed_alias, None, set(), refusal
        self._own_options_first()

    def refuse(self, names: list[str], generic: str):
        """End the command for option names no dataclass has: `refusal(names)` says why (another method's
        options, close matches) when the command has one, else `generic`."""
        self.error(self.refusal(names) if self.refusal is not None and names else generic)

    def error(self, message: str):
        """Two lines, naming the command (argparse would print the whole usage first: ~80 lines for `train`)."""
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")

    def _own_options_first(self) -> None:
        """In --help, the trainer's influence_* options get a group of their own, and the few hundred options
        InfluenceSFTConfig inherits from TRL's SFTConfig and transformers' TrainingArguments come last, titled
        as what they are (HfArgumentParser puts a dataclass without `_argument_group_name` in the main group)."""
        inherited = self._optionals
        own = [action for action in inherited._group_actions if action.dest.startswith("influence_")]
        if not own:
            return
        group = self.add_argument_group("influence selection (InfluenceSFTConfig)")
        for action in own:
            inherited._group_actions.remove(action)
            group._group_actions.append(action)
        inherited.title = "training (TRL's SFTConfig and transformers' TrainingArguments)"
        self._action_groups.remove(inherited)
        self._action_groups.append(inherited)

    def set_defaults_with_config(self, **values) -> list[str]:
        if self.seed_alias and "seed" in values:
            warnings.warn(f"{self.config_path}: the key `seed` is deprecated (the gradient projection's seed); write "
                          f"projection_seed.", FutureWarning, stacklevel=2)
            values["projection_seed"] = values.pop("seed")
        self.config_keys = set(values)
        unknown = sorted(set(values) - {action.dest for action in self._actions})
        if unknown:  # TRL hands them back as strings; argparse would then call them unrecognised flags
            self.refuse(unknown, f"{self.config_path} has unknown keys {unknown}; see --help for the options of this "
                                 f"command")
        return super().set_defaults_with_config(**values)


def selection_types(argv: list[str], method: str | None = None) -> tuple[tuple[type, ...], Callable]:
    """The option dataclasses of a selection command and the refusal of the options they lack: the shared
    configs plus the method's own (`options.method_config_types`) for the method and NN-CIFT oracle argv names
    (flags over the --config YAML over the defaults), or for `method` when the command fixes it. `--help` then
    shows the shared groups and that method's, and another method's option is refused by name."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--method", "--oracle", "--config"):
        early.add_argument(flag)
    given, _ = early.parse_known_args(argv)
    defaults = {}
    if given.config is not None and Path(given.config).is_file():  # `parse` refuses a missing file
        loaded = yaml.safe_load(Path(given.config).read_text())
        defaults = loaded if isinstance(loaded, dict) else {}
    method = method or given.method or defaults.get("method") or SelectionConfig.method
    oracle = given.oracle or defaults.get("oracle")
    own = method_config_types(method, oracle)
    oracle = (oracle or NNCIFTConfig.oracle) if NNCIFTConfig in own else None
    return (*SHARED_CONFIG_TYPES, *own), lambda names: refusal_message(names, method, oracle)


def parse(argv: list[str], dataclass_types: tuple, description: str, command: str,
          used: set[str] | None = None, refusal: Callable[[list[str]], str] | None = None) -> tuple:
    """Parse argv into the dataclasses with TRL's parser; precedence: flags over the --config YAML over the fields'
    defaults.

    command: the subcommand's name, for the usage line and the errors (`hf-influence COMMAND: error: ...`).
    used: the options the command reads (None: all); a flag or YAML key outside them ends the command with a
    one-line error (exit code 2) instead of being accepted and ignored.
    refusal: `refusal(option names)` -> the error for flags or YAML keys no dataclass has (`selection_types`'s,
    naming the method an option belongs to); None: a generic one."""
    # --seed was GradientConfig's projection seed until the rename: still read (hidden), with a warning.
    seed_alias = any(config is GradientConfig for config in dataclass_types) and not any(
        "seed" in getattr(config, "__dataclass_fields__", {}) for config in dataclass_types)
    # No prefix abbreviations: `--num_land 4` would silently mean whichever option it abbreviates today.
    prog = f"hf-influence {command}"
    parser = CommandParser(dataclass_types, seed_alias, refusal, prog=prog,
                           usage=f"{prog} [--config FILE.yaml] [options]", description=description, allow_abbrev=False)
    # TrlParser reads --config itself; declared here so that --help lists it.
    parser.add_argument("--config", default=None, help="YAML file of defaults (TRL's format, `env:` included); "
                                                        "flags override it.")
    if seed_alias:
        parser.add_argument("--seed", dest="projection_seed", type=int, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
        if any(arg == "--seed" or arg.startswith("--seed=") for arg in argv):
            warnings.warn("--seed is deprecated: it sets the gradient projection's seed; use --projection_seed "
                          "(or --selection_seed for the selection).", FutureWarning, stacklevel=2)
    # TrlParser looks for `--config PATH`: the `--config=PATH` spelling is split into that form.
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if "--config" in argv:
        parser.config_path = argv[argv.index("--config") + 1] if argv.index("--config") + 1 < len(argv) else None
        if parser.config_path is None or not Path(parser.config_path).is_file():
            parser.error(f"--config {parser.config_path!r} is not a file")
    *parsed, extra = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    if extra:
        parser.refuse([arg[2:].split("=", 1)[0] for arg in extra if arg.startswith("--")],
                      f"unrecognised arguments: {' '.join(extra)}")
    if used is not None:
        given = {action.dest for action in parser._actions for flag in action.option_strings
                 if any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)} | parser.config_keys
        ignored = sorted(given - used - {"config", "help"})
        if ignored:
            parser.error(f"this command does not use {', '.join('--' + name for name in ignored)}: remove "
                         f"{'it' if len(ignored) == 1 else 'them'} (see --help)")
    # The --config flag comes back as a trailing Namespace after the dataclasses.
    return tuple(parsed[: len(dataclass_types)])


def load_cli_model(model_args: ModelArguments, model_init_kwargs: dict | None = None):
    """The command's model: --model with --dtype / --revision, and --model_init_kwargs (the same loading options
    as JSON, as the Python API takes them) merged in; one option given both ways with two values is refused.
    Under `accelerate launch` / torchrun each process runs the model on its own device, else CUDA when there is
    one."""
    state = process_state()
    device = state.device if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    flags = {"dtype": model_args.dtype, "revision": model_args.revision, "device": device}
    defaults = {f.name: f.default for f in fields(ModelArguments)}
    given = {name: value for name, value in flags.items() if name != "device" and value != defaults[name]}
    init = dict(model_init_kwargs or {})
    clash = sorted(name for name in init.keys() & given.keys() if str(init[name]) != str(given[name]))
    if clash:
        raise SystemExit(f"--{clash[0]} {given[clash[0]]!r} and --model_init_kwargs {{{clash[0]!r}: "
                         f"{init[clash[0]]!r}}} disagree: give it once.")
    return load_model(model_args.model, **{**flags, **init})


def is_main_process() -> bool:
    state = process_state()
    return state is None or state.is_main_process


def parse_budget(text: str, flag: str = "--budget") -> int | float:
    """selection.parse_budget, with a bad value ending the command with its one-line message (no traceback)."""
    try:
        return parse_budget_value(text, flag)
    except SelectionError as error:
        raise SystemExit(str(error)) from None


def load_pool_and_target(args: SelectArguments) -> tuple[Dataset, Dataset]:
    if not args.pool or not args.target:
        raise SystemExit("--pool and --target are required: a jsonl/json/parquet/csv file, a folder, or a Hub id.")
    pool = load_rows(args.pool, split=args.pool_split, limit=args.pool_limit)
    default_group = next(f.default for f in fields(SelectArguments) if f.name == "group_column")
    if args.group_column != default_group and args.group_column not in pool.column_names:
        # Asked for by name, so an empty per-group report would hide a typo.
        raise SystemExit(f"--group_column {args.group_column!r} is not a column of the pool "
                         f"(columns: {', '.join(pool.column_names)}).")
    return pool, load_rows(args.target, split=args.target_split, limit=args.target_limit)
