"""Tulu V2 recipes: select 5% of allenai/tulu-v2-sft-mixture for a target task with Influence Distillation and
fine-tune on it with InfluenceSFTTrainer, or distil the selection into an NN-CIFT InfluenceNetwork and push it.

    accelerate launch recipes/tulu_v2/run.py --targets gsm8k mmlu                 # GPUs: the YAML configs as written
    python recipes/tulu_v2/run.py --targets gsm8k --offline                       # CPU smoke run, no Hub
    python recipes/tulu_v2/run.py --targets gsm8k --network --repo_id me/tulu-v2-id   # NN-CIFT, pushed to the Hub
    python recipes/tulu_v2/run.py --targets gsm8k mmlu bbh tydiqa --pretrained --repo_id me/tulu-v2-nn-cift
                                                              # one network over every target: for new targets
    python recipes/tulu_v2/run.py --targets bbh --offline -- --max_steps 8        # flags after `--` reach the CLI

Train mode runs, per target, `hf_influence.cli.run_train` (the `hf-influence train` command: warm-up, selection,
SFT, summary.json) with `--config <target>.yaml` and then, later flags winning: the --offline settings, --pool /
--data_dir, the held-out rows, and the flags after `--`. The selection options are rebuilt from the YAML's
`influence_options` mapping (a flag would replace the whole mapping), with --offline's CPU sizes and a work_dir
under --output_root. Network mode runs `hf-influence fit-network` with network.yaml on the same seeded pool sample
as the SFT recipe (so the score table's pool_row_id indexes that recipe's pool), then `hf-influence push`.
Pretrained mode fits one network the same way against the rows of every --targets task together, so that its
block holds targets of several tasks and the network is meant for targets it never saw (`select_with_network`,
`hf-influence predict --network REPO_ID`); it is pushed to --repo_id with its card.

Rows the CLI cannot reach by flags are written once to parquet files under --output_root (by the main process
first under `accelerate launch`): the held-out split of GSM8K / MMLU from the Hub, every BBH subtask config from the
Hub, and in network mode the pool sample and the target rows as prompt/completion.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset, concatenate_datasets
from transformers import HfArgumentParser

from hf_influence import cli
from hf_influence.data import load_rows, sample_rows  # the sample of `train --pool_sample`
from hf_influence.extraction.distributed import process_state
from hf_influence.networks.encoders import DEFAULT_ENCODER
from hf_influence.models import DEFAULT_MODEL
from hf_influence.extraction.store import atomic_write_json
from hf_influence.targets import TARGET_TASKS, load_target

RECIPE_DIR = Path(__file__).resolve().parent
REPO_DIR = RECIPE_DIR.parents[1]
SHARED_DATA = REPO_DIR.parent / "shared" / "data"
TARGETS = ("gsm8k", "mmlu", "bbh", "tydiqa", "squad", "codex")


@dataclass(frozen=True)
class HeldOut:
    """Rows of a task kept out of selection, whose loss `hf-influence train` measures before and after SFT.

    Attributes:
        hub_id: Hub dataset (`owner/name:config`).
        split: its held-out split (the target comes from another one).
        local_file: the same rows under the shared data folder.
        rows: seeded random sample measured (the GPU runs; --offline measures 16).
    """

    hub_id: str
    split: str
    local_file: str
    rows: int


# Only these tasks keep their target and held-out rows in different splits; the others draw both from one split.
HELD_OUT = {
    "gsm8k": HeldOut("openai/gsm8k:main", "test", "targets/gsm8k_test.jsonl.gz", 500),
    "mmlu": HeldOut("cais/mmlu:all", "test", "targets/mmlu_test.jsonl.gz", 1000),
}

# --offline: the embedded SmolLM2-135M on 2 CPU cores, a few minutes per target. SmolLM2's chat template has no
# assistant-mask markers and TRL ships no training version of it, so the loss covers the whole sequence there.
OFFLINE_TRAIN_FLAGS = {
    "model": DEFAULT_MODEL, "dtype": "float32", "pool_sample": 128, "target_limit": 8, "lora_r": 8, "lora_alpha": 32,
    "max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "bf16": False,
    "tf32": False, "assistant_only_loss": False, "logging_steps": 1,
}
OFFLINE_SELECTION_OPTIONS = {
    "num_landmarks": 16, "projection_dim": 1024, "batch_size": 4, "num_blocks": 2, "jvp_projection_dim": 256,
    "jvp_batch_size": 8, "warmup_batch_size": 2, "warmup_min_steps": 4,
}
OFFLINE_HELD_OUT_ROWS = 16
OFFLINE_NETWORK_FLAGS = {
    "model": DEFAULT_MODEL, "dtype": "float32", "encoder": DEFAULT_ENCODER, "block_fraction": 0.25,
    "evaluation_fraction": 0.25, "min_block_rows": 16, "network_epochs": 5, "lora_r": 8, "lora_alpha": 32,
    "projection_dim": 1024, "batch_size": 4, "warmup_batch_size": 2, "warmup_min_steps": 4,
}


@dataclass
class RecipeArguments:
    """Which targets to run, in which mode, on which data, and where the outputs go.

    Attributes:
        targets: target tasks, each with its YAML in recipes/tulu_v2 (gsm8k, mmlu, bbh, tydiqa, squad, codex).
        offline: CPU smoke run without the Hub: the embedded default model, the shared pool and target files
            (../shared/data beside the repository), a 128-row pool sample, 4 SFT steps, CPU-sized selection.
        pool: pool file, folder or Hub dataset id instead of the YAML's (offline: ../shared/data/pool.jsonl.gz).
        data_dir: shared data folder holding targets/*.jsonl.gz (offline: ../shared/data); the task's file there
            is its target (and held-out rows) when present, else the Hub's.
        target_files: TASK=PATH pairs: a task's target rows from a file in its Hub or shared schema (SQuAD and
            Codex have no shared file, so --offline needs one for them).
        output_root: each target writes under OUTPUT_ROOT/TASK (network mode: OUTPUT_ROOT/network/TASK).
        network: fit an NN-CIFT InfluenceNetwork per target with network.yaml instead of selection + SFT.
        pretrained: fit one InfluenceNetwork with network.yaml against every target's rows together (output
            OUTPUT_ROOT/network/pretrained), pushed to REPO_ID itself (scores: REPO_ID-scores, config pretrained).
        repo_id: network mode: push each network to REPO_ID-TASK (model repo) and its score table to
            REPO_ID-scores (dataset repo, config TASK); None pushes nothing.
    """

    targets: list[str] = field(default_factory=lambda: list(TARGETS), metadata={"help": "Target tasks."})
    offline: bool = field(default=False, metadata={"help": "CPU smoke run: default model, local data, few steps."})
    pool: str | None = field(default=None, metadata={"help": "Pool file, folder or Hub id (overrides the YAML)."})
    data_dir: str | None = field(default=None, metadata={"help": "Shared data folder with targets/."})
    target_files: list[str] = field(default_factory=list, metadata={"help": "TASK=PATH target files."})
    output_root: str = field(default="runs/tulu_v2", metadata={"help": "Output folder of all targets."})
    network: bool = field(default=False, metadata={"help": "Fit and push an NN-CIFT network per target."})
    pretrained: bool = field(default=False, metadata={"help": "Fit and push one NN-CIFT network over all targets."})
    repo_id: str | None = field(default=None, metadata={"help": "Network mode: Hub repo prefix to push to."})

    def __post_init__(self) -> None:
        if self.network and self.pretrained:
            raise ValueError("--network (a network per target) and --pretrained (one over all targets) exclude each "
                             "other.")
        unknown = [task for task in self.targets if task not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--targets must name tasks of {list(TARGETS)}, got {self.targets}.")
        for pair in self.target_files:
            task, separator, path = pair.partition("=")
            if not separator or task not in TARGETS or not path:
                raise ValueError(f"--target_files takes TASK=PATH pairs with TASK in {list(TARGETS)}, got {pair!r}.")
        if self.offline and self.data_dir is None:
            if not SHARED_DATA.is_dir():
                raise FileNotFoundError(f"--offline reads the shared data folder {SHARED_DATA}, which is absent: "
                                        f"pass --data_dir and --pool.")
            self.data_dir = str(SHARED_DATA)
        if self.offline and self.pool is None:
            self.pool = str(SHARED_DATA / "pool.jsonl.gz")
        if self.offline:  # fail before the first target runs, not at the turn of the one without rows
            files = dict(pair.partition("=")[::2] for pair in self.target_files)
            missing = [task for task in self.targets if task not in files and not (
                TARGET_TASKS[task].local_file and (Path(self.data_dir) / TARGET_TASKS[task].local_file).exists())]
            if missing:
                raise ValueError(f"--offline has no target rows for {missing} in {self.data_dir}: pass files in their "
                                 f"Hub schema (see hf_influence.targets) as --target_files "
                                 f"{' '.join(f'{task}=PATH' for task in missing)}.")


def recipe_config(name: str) -> tuple[Path, dict]:
    """(path, mapping) of the YAML `name` in this folder."""
    path = RECIPE_DIR / f"{name}.yaml"
    return path, yaml.safe_load(path.read_text())


def as_flags(values: dict) -> list[str]:
    """{"lora_r": 8, "bf16": False} -> ["--lora_r", "8", "--bf16", "false"]."""
    flags = []
    for name, value in values.items():
        flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def write_rows_once(path: Path, make_rows: Callable[[], Dataset]) -> Path:
    """Write `make_rows()` to the parquet file `path` unless it exists; the main process goes first under a
    multi-process launch, so the others find the file. Written to a temporary name and renamed (atomic)."""
    state = process_state()
    with state.main_process_first() if state is not None else nullcontext():
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            make_rows().to_parquet(str(partial))
            os.replace(partial, path)
    return path


def target_source(task: str, args: RecipeArguments) -> str | None:
    """Where the task's target rows come from: a --target_files file, the shared file, or None for load_target's
    own choice (the task's Hub dataset; every subtask config for BBH)."""
    files = dict(pair.partition("=")[::2] for pair in args.target_files)
    if task in files:
        return files[task]
    local = TARGET_TASKS[task].local_file
    if args.data_dir is not None and local is not None and (Path(args.data_dir) / local).exists():
        return str(Path(args.data_dir) / local)
    return None


def held_out_source(task: str, args: RecipeArguments, output_dir: Path) -> str | None:
    """The task's held-out rows (shared file, else its Hub split written to a file); None for tasks without."""
    spec = HELD_OUT.get(task)
    if spec is None:
        return None
    if args.data_dir is not None and (Path(args.data_dir) / spec.local_file).exists():
        return str(Path(args.data_dir) / spec.local_file)
    return str(write_rows_once(output_dir / "held_out.parquet", lambda: load_rows(spec.hub_id, split=spec.split)))


def train_argv(task: str, args: RecipeArguments, extra: list[str]) -> list[str]:
    """The `hf-influence train` arguments of one target (see the module docstring for the precedence)."""
    config_path, config = recipe_config(task)
    output_dir = Path(args.output_root) / task
    options = dict(config.get("influence_options") or {})
    # One work_dir for every target: the pool-side stores (JVP embeddings, landmark gradients) and the warm-up
    # are the same for all six, so only the first target pays for them; target gradients are kept per target.
    options["work_dir"] = str(Path(args.output_root) / "selection")
    argv = ["--config", str(config_path), "--output_dir", str(output_dir)]
    if args.offline:
        options.update(OFFLINE_SELECTION_OPTIONS)
        argv += as_flags(OFFLINE_TRAIN_FLAGS)
    if args.pool is not None:
        argv += ["--pool", args.pool]
    if args.data_dir is not None:
        argv += ["--data_dir", args.data_dir]
    if "--target" not in extra:
        source = target_source(task, args)
        argv += ["--target", source] if source is not None else []
    if "--eval_target" not in extra:
        held_out = held_out_source(task, args, output_dir)
        if held_out is not None:
            rows = OFFLINE_HELD_OUT_ROWS if args.offline else HELD_OUT[task].rows
            argv += ["--eval_target", held_out, "--eval_limit", str(rows)]
    return [*argv, "--influence_options", json.dumps(options), *extra]


def network_argv(tasks: list[str], name: str, args: RecipeArguments, extra: list[str]) -> list[str]:
    """The `hf-influence fit-network` arguments of a network over the rows of `tasks` (output OUTPUT_ROOT/network/
    NAME): network.yaml, the SFT recipe's pool sample and the tasks' target rows (as prompt/completion, one file),
    the --offline settings, then the flags after `--`."""
    config_path, _ = recipe_config("network")
    _, task_config = recipe_config(tasks[0])  # the task YAMLs differ only in their target (a test checks it)
    offline = OFFLINE_TRAIN_FLAGS if args.offline else {}
    source_pool, pool_split = args.pool or task_config["pool"], task_config.get("pool_split", "train")
    count = offline.get("pool_sample", task_config.get("pool_sample"))
    seed = task_config.get("sample_seed", 0)
    root = Path(args.output_root) / "network"
    output = root / name
    pool = source_pool
    if count is not None:
        key = hashlib.sha256(f"{source_pool}:{pool_split}".encode()).hexdigest()[:12]
        pool = str(write_rows_once(root / f"pool-{key}-sample{count}-seed{seed}.parquet", lambda: sample_rows(
            load_rows(source_pool, split=pool_split), count, seed)))
    # The oracle's gradient stores (a rerun resumes each block) and the target rows live beside the output folder,
    # which fit-network replaces as a whole.
    argv = ["--config", str(config_path), "--pool", pool, "--pool_split", pool_split, "--output", str(output),
            "--work_dir", str(root / f"{name}-oracle")]
    if "--target" not in extra:  # fit-network reads --target as is: write the tasks' rows as prompt/completion
        sources = {task: (target_source(task, args), offline.get("target_limit", recipe_config(task)[1].get(
            "target_limit"))) for task in tasks}
        key = hashlib.sha256(f"{sorted(sources.items())}:{args.data_dir}:{seed}".encode()).hexdigest()[:12]
        argv += ["--target", str(write_rows_once(root / f"{name}-target-{key}.parquet", lambda: concatenate_datasets([
            load_target(task, source=source, data_dir=args.data_dir, limit=limit, seed=seed)
            for task, (source, limit) in sources.items()])))]
    return [*argv, *as_flags(OFFLINE_NETWORK_FLAGS if args.offline else {}), *extra]


def run_network(tasks: list[str], name: str, repo_id: str | None, args: RecipeArguments, extra: list[str]) -> dict:
    """fit-network over the tasks' rows, then push the network to `repo_id` and its score table to
    `<repo_id>-scores` (config NAME) when a repo id is given."""
    report = cli.run_fit_network(network_argv(tasks, name, args, extra))
    output = Path(args.output_root) / "network" / name
    if repo_id:
        report["network_repo"] = cli.run_push(["--network", str(output), "--repo_id", repo_id])
        report["scores_repo"] = cli.run_push(["--scores", str(output / "scores"), "--repo_id",
                                              f"{args.repo_id}-scores", "--config_name", name])
    return report


def _print_summaries(summaries: dict[str, dict]) -> None:
    print(f"\n{'target':<8}{'trained rows':>14}{'selection s':>13}{'training s':>12}{'loss before':>13}"
          f"{'loss after':>12}")
    for task, summary in summaries.items():
        before, after = summary.get("target_loss_before"), summary.get("target_loss_after")
        print(f"{task:<8}{summary['influence']['training_rows']:>14}{summary['selection_seconds']:>13.1f}"
              f"{summary['train_seconds']:>12.1f}{'-' if before is None else f'{before:.4f}':>13}"
              f"{'-' if after is None else f'{after:.4f}':>12}")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run the recipe for each target; returns {task: summary (train) or fit-network report (network)}."""
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    (args,) = HfArgumentParser(RecipeArguments, description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses(
        args=ours)
    state = process_state()
    main_process = state is None or state.is_main_process
    if (args.network or args.pretrained) and state is not None:
        raise SystemExit("--network runs in one process (fit-network writes one network and score table): launch it "
                         "with python, not accelerate launch / torchrun.")
    if args.pretrained:
        return {"pretrained": run_network(list(args.targets), "pretrained", args.repo_id, args, extra)}
    results = {}
    for task in args.targets:
        if args.network:
            results[task] = run_network([task], task, args.repo_id and f"{args.repo_id}-{task}", args, extra)
        else:
            results[task] = cli.run_train(train_argv(task, args, extra))
        # The next target loads its own model: free this one's before it does.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if main_process and not args.network:
        summary_file = Path(args.output_root) / "summary.json"
        previous = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        atomic_write_json(summary_file, {**previous, **results})
        _print_summaries(results)
    return results


if __name__ == "__main__":
    main()
