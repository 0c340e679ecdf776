"""Does the selection help training? The evaluation of record: LoRA SFT on each method's selection, held-out
target loss before and after, over several selection and training seeds, with 95% confidence intervals.

    python benchmarks/downstream.py --cache CACHE --json benchmarks/results/downstream_cpu.json \
        [--plot benchmarks/results/downstream_cpu.png] [--quick]

Design (each choice fixed before any result was seen; none is tuned on the evaluation rows):
- Pool: one seeded slice of ../shared/data/pool.jsonl.gz (default 2,048 rows, max_length 256), the same for
  every method and target. Its model-side pieces (warm-up, JVP embeddings, LoRA gradients, RDS+ embeddings) live
  in CACHE/work, the `work_dir` of every `select_by_influence` call, and are computed once: a second target or
  method reuses them (the library keys each store by model, rows and config).
- Targets: GSM8K (selection: train problems with worked solutions; evaluation: test problems), MMLU
  (selection: dev questions; evaluation: test questions; the loss is on the answer the loader produces) and
  BBH (one file: the evaluation rows are drawn from the rows left after the selection rows). Evaluation rows
  never overlap selection rows (checked by id and by prompt).
- Loss: `target_loss`, the mean over evaluation rows of each row's mean response-token cross-entropy. The
  change is after - before: negative is better.
- Methods: the library's registry names. `random` is drawn with `random_seeds` selection seeds; the others are
  deterministic for a seed and use selection seed 0. Every selection is trained with `train_seeds` training
  seeds (LoRA init and data order): `InfluenceSFTTrainer` in select mode, given the method's ScoreTable (so the
  trainer itself picks the rows; the benchmark checks they are the rows `select_by_influence` picked), fixed
  steps, constant lr.
- Variants: "method:option=value,..." runs a registry method with other select_by_influence options (e.g.
  "influence_distillation:selection=mean_top_k"), for the analysis of what helps; reported beside the methods.
- Statistics per target and method: mean, std (ddof 1) and t-interval (95%) of the loss change over all its runs;
  the paired difference against random: for each training seed, the method's mean change minus random's mean
  change over its selection seeds at that training seed (the training seed is shared, so its effect cancels),
  then the mean and t-interval over training seeds; `sd_below_random`: (random mean - method mean) / random's
  std over all its runs (the issue's "2 standard deviations of random").

Resumable: each selection (its ScoreTable in CACHE/tables) and each training run (CACHE/runs.json, written
atomically after every run) is kept; a rerun after a crash does only what is missing and gives the same JSON.
A rerun may ask for more or fewer targets, methods and seeds (EXTENTS); any other setting must be the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import scipy.stats
import torch
from datasets import Dataset
from peft import LoraConfig
from selection_quality import DEFAULT_DATA_DIR, in_domain_share, machine

from hf_influence import (DEFAULT_MODEL, InfluenceSFTConfig, InfluenceSFTTrainer, ScoreTable, load_model, load_target,
                          select_by_influence, target_loss)
from hf_influence.data import load_rows
from hf_influence.formatting import FormattingConfig
from hf_influence.options import SelectionConfig
from hf_influence.selection import resolve_budget, select_indices
from hf_influence.store import atomic_write_json
from hf_influence.targets import sample_rows

METHODS = ("influence_distillation", "influence_distillation_exact", "less", "rds", "nn_cift", "random")
# Target name -> (task, load_target options of the selection rows, of the evaluation candidates).
TARGETS = {
    "gsm8k": ("gsm8k", {}, {"held_out": True}),
    "mmlu": ("mmlu", {}, {"held_out": True}),
    "bbh": ("bbh", {}, {}),
}


# Settings that only say how many runs to make: every run's key names its target, method and seeds, so a
# rerun may extend or shrink them (--quick reads a subset of the full run's runs).
EXTENTS = ("targets", "methods", "random_seeds", "train_seeds")


@dataclass
class Settings:
    """Everything that defines a run. The fields other than EXTENTS are stored with the results, and a rerun
    on a cache made with other values is refused (its runs would not be comparable)."""

    pool_rows: int = 2048
    max_length: int = 256
    selection_rows: int = 32
    eval_rows: int = 64
    # Sized so that the full run (3 targets x 10 selections x 3 training seeds) fits in about two hours of a
    # 2-core CPU: one SmolLM2 step of 4 rows x 256 tokens takes ~7 s there. 32 rows (1.6% of the pool) and
    # one epoch over them (8 steps of 4) at a usual LoRA learning rate; fixed before any result was seen.
    budget: int | float = 32
    num_landmarks: int = 128
    targets: tuple[str, ...] = tuple(TARGETS)
    methods: tuple[str, ...] = METHODS
    random_seeds: int = 5
    train_seeds: int = 3
    max_steps: int = 8
    batch_size: int = 4
    learning_rate: float = 5e-4
    lora_r: int = 8
    seed: int = 0
    # Extra select_by_influence options (the tests make the tiny model's runs fast with them).
    options: dict = field(default_factory=dict)

    def selection_seeds(self, method: str) -> range:
        return range(self.random_seeds if parse_method(method)[0] == "random" else 1)


def parse_method(name: str) -> tuple[str, dict]:
    """A registry method, or a variant of one with select_by_influence options, written
    "method:option=value,option=value" (values are JSON where they parse, else strings), e.g.
    "influence_distillation:selection=mean_top_k". Returns (registry method, options)."""
    method, _, rest = name.partition(":")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in {name!r}; known: {METHODS}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"{name!r}: write options as option=value, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return method, options


@dataclass
class BenchmarkData:
    pool: Dataset  # raw pool rows, with `source`
    targets: dict[str, tuple[Dataset, Dataset]]  # name -> (selection rows, evaluation rows)


def disjoint_evaluation(selection: Dataset, candidates: Dataset, rows: int, seed: int) -> Dataset:
    """`rows` evaluation rows drawn (seeded) from `candidates` minus every row that shares an id or a prompt
    with a selection row."""
    ids, prompts = set(selection["id"]), set(selection["prompt"])
    keep = [i for i, (row_id, prompt) in enumerate(zip(candidates["id"], candidates["prompt"]))
            if row_id not in ids and prompt not in prompts]
    if len(keep) < rows:
        raise ValueError(f"only {len(keep)} evaluation rows are left after removing the selection rows; "
                         f"asked for {rows}")
    return sample_rows(candidates.select(keep), rows, seed)


def load_data(data_dir: Path, settings: Settings) -> BenchmarkData:
    """The seeded pool slice and, per target, its selection rows and disjoint evaluation rows."""
    pool = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=settings.seed).select(range(settings.pool_rows))
    targets = {}
    for name in settings.targets:
        task, selection_options, evaluation_options = TARGETS[name]
        selection = load_target(task, data_dir=data_dir, limit=settings.selection_rows, seed=settings.seed,
                                **selection_options)
        candidates = load_target(task, data_dir=data_dir, **evaluation_options)
        targets[name] = selection, disjoint_evaluation(selection, candidates, settings.eval_rows, settings.seed + 1)
    return BenchmarkData(pool, targets)


class RunLog:
    """A JSON object of finished results, rewritten atomically after every change (crash-safe resume)."""

    def __init__(self, path: Path, settings: Settings):
        self.path = path
        recorded = {key: value for key, value in asdict(settings).items() if key not in EXTENTS}
        if path.exists():
            self.data = json.loads(path.read_text())
            made_with = {key: value for key, value in self.data["settings"].items() if key not in EXTENTS}
            if made_with != recorded:
                changed = sorted(key for key in recorded if made_with.get(key) != recorded[key])
                raise ValueError(f"{path} was made with other settings ({', '.join(changed)} differ: "
                                 f"{ {key: made_with.get(key) for key in changed} }); use another --cache or the "
                                 f"same settings")
        else:
            self.data = {"settings": recorded, "results": {}}

    def get(self, key: str):
        return self.data["results"].get(key)

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def describe_selection(pool: Dataset, row_ids: list[int]) -> dict:
    """What the selected rows look like: source families (the part before '/') and mean characters per row."""
    rows = pool.select(row_ids)
    families = Counter(source.split("/")[0] for source in rows["source"])
    characters = [sum(len(m["content"]) for m in messages) for messages in rows["messages"]]
    return {"in_domain_share_gsm8k": in_domain_share(rows["source"]), "source_families": dict(families),
            "mean_characters": float(np.mean(characters))}


def variant_work_dir(work_dir: Path, variant: dict) -> Path:
    """Where a variant's stores go. One that changes the model-side passes (warm-up, gradients, JVP, LoRA,
    formatting: any option that is not a SelectionConfig field, and optimizer_state) gets a sibling folder named
    by those options: the shared stores were made with the defaults, and the library refuses to mix them (with
    overwrite it would replace what every other method reuses). Selection-only options share `work_dir`."""
    selection_only = {f.name for f in dataclasses.fields(SelectionConfig)} - {"optimizer_state"}
    own = {key: value for key, value in variant.items() if key not in selection_only}
    if not own:
        return work_dir
    digest = hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:12]
    return work_dir.with_name(f"{work_dir.name}-{digest}")


def select(data: BenchmarkData, target: str, method: str, selection_seed: int, settings: Settings, cache: Path,
           work_dir: Path, model_loader: Callable) -> dict:
    """Run `select_by_influence` once (stores in `work_dir`); its ScoreTable goes to
    cache/tables/<target>/<method>-<seed>."""
    model, tokenizer = model_loader()
    registered, variant = parse_method(method)
    work_dir = variant_work_dir(work_dir, variant)
    options = {"max_length": settings.max_length, "selection_seed": selection_seed, "work_dir": str(work_dir),
               "show_progress": False, "warmup_show_progress": False, **settings.options}
    if registered == "influence_distillation":
        options["num_landmarks"] = settings.num_landmarks
    start = time.perf_counter()
    selected, table = select_by_influence(data.pool, data.targets[target][0], model=model, tokenizer=tokenizer,
                                          budget=settings.budget, method=registered, return_scores=True,
                                          **{**options, **variant})
    seconds = time.perf_counter() - start
    table.save(cache / "tables" / target / f"{method}-{selection_seed}")
    row_ids = table.provenance["selected_pool_row_ids"]
    return {"selected_pool_row_ids": row_ids, "selection_seconds": seconds, **describe_selection(data.pool, row_ids),
            "landmarks": table.provenance["details"].get("landmarks")}


def train(data: BenchmarkData, target: str, method: str, selection_seed: int, train_seed: int, selection: dict,
          settings: Settings, cache: Path, model_loader: Callable) -> dict:
    """LoRA SFT of a fresh model on the rows the trainer selects from the saved ScoreTable; the change of the
    evaluation rows' loss."""
    model, tokenizer = model_loader()
    table = ScoreTable.load(cache / "tables" / target / f"{method}-{selection_seed}")
    config = InfluenceSFTConfig(
        output_dir=str(cache / "trainer"), influence_mode="select", influence_budget=settings.budget,
        influence_method=parse_method(method)[0],
        influence_options={"selection": table.provenance["selection"], "selection_seed": selection_seed},
        max_steps=settings.max_steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        max_length=settings.max_length, bf16=False, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=train_seed, data_seed=train_seed, gradient_checkpointing=False)
    trainer = InfluenceSFTTrainer(model, args=config, train_dataset=data.pool, influence_score_table=table,
                                  processing_class=tokenizer,
                                  peft_config=LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
    chosen = trainer.influence_selections[-1].row_ids
    if sorted(chosen) != sorted(selection["selected_pool_row_ids"]):
        raise RuntimeError(f"{target}/{method}/{selection_seed}: the trainer selected other rows than "
                           f"select_by_influence from the same table")
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    after = target_loss(trainer.model, tokenizer, data.targets[target][1],
                        FormattingConfig(max_length=settings.max_length))
    return {"selection_seed": selection_seed, "train_seed": train_seed, "target_loss_after": after,
            "train_seconds": seconds, "train_loss": result.training_loss, "steps": result.global_step}


def run_benchmark(data: BenchmarkData, settings: Settings, cache: Path, model_loader: Callable,
                  work_dir: Path | None = None) -> RunLog:
    """Every missing selection and training run, target by target (a finished one is never redone). The model
    stores go to `work_dir` (default cache/work): runs with other settings can share them."""
    work_dir = work_dir or cache / "work"
    log = RunLog(cache / "runs.json", settings)
    formatting = FormattingConfig(max_length=settings.max_length)
    for target in settings.targets:
        if log.get(f"{target}/before") is None:
            model, tokenizer = model_loader()
            log.put(f"{target}/before", target_loss(model, tokenizer, data.targets[target][1], formatting))
        for method in settings.methods:
            for selection_seed in settings.selection_seeds(method):
                key = f"{target}/{method}/selection-{selection_seed}"
                if log.get(key) is None:
                    _log(f"select {key}")
                    log.put(key, select(data, target, method, selection_seed, settings, cache, work_dir, model_loader))
                for train_seed in range(settings.train_seeds):
                    run_key = f"{key}/train-{train_seed}"
                    if log.get(run_key) is None:
                        record = train(data, target, method, selection_seed, train_seed, log.get(key), settings,
                                       cache, model_loader)
                        log.put(run_key, record)
                        _log(f"{run_key}: loss change {record['target_loss_after'] - log.get(f'{target}/before'):+.4f}"
                             f" ({record['train_seconds']:.0f} s)")
    return log


def interval(values: list[float]) -> tuple[float, float, list[float] | None]:
    """Mean, std (ddof 1) and the 95% t-interval of the mean; std 0 and no interval for a single value."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, 0.0, None
    std = float(array.std(ddof=1))
    half = float(scipy.stats.t.ppf(0.975, len(array) - 1)) * std / math.sqrt(len(array))
    return mean, std, [mean - half, mean + half]


def summarize_target(runs: dict[str, list[dict]], selections: dict[str, list[dict]], before: float) -> dict:
    """Per method: the statistics of the loss change (see the module docstring). `runs[method]` holds training
    records (selection_seed, train_seed, target_loss_after, train_seconds); `selections[method]` the selection
    records."""
    changes = {method: [run["target_loss_after"] - before for run in method_runs] for method, method_runs in runs.items()}

    def by_train_seed(method: str) -> dict[int, float]:
        grouped: dict[int, list[float]] = {}
        for run, change in zip(runs[method], changes[method]):
            grouped.setdefault(run["train_seed"], []).append(change)
        return {seed: float(np.mean(values)) for seed, values in grouped.items()}

    random_mean, random_std, _ = interval(changes["random"]) if "random" in runs else (None, None, None)
    random_by_seed = by_train_seed("random") if "random" in runs else {}
    methods = {}
    for method in runs:
        mean, std, ci = interval(changes[method])
        record = {"loss_change_mean": mean, "loss_change_std": std, "loss_change_ci95": ci,
                  "selection_seconds": float(np.mean([s["selection_seconds"] for s in selections[method]])),
                  "train_seconds": float(np.mean([run["train_seconds"] for run in runs[method]])),
                  "runs": [{**run, "loss_change": change} for run, change in zip(runs[method], changes[method])],
                  "selections": selections[method]}
        if random_by_seed:
            own = by_train_seed(method)
            paired = [own[seed] - random_by_seed[seed] for seed in sorted(own) if seed in random_by_seed]
            record["diff_vs_random_mean"], _, record["diff_vs_random_ci95"] = interval(paired)
            record["sd_below_random"] = (random_mean - mean) / random_std if random_std else None
        methods[method] = record
    return {"loss_before": before, "methods": methods}


def summarize(log: RunLog, settings: Settings) -> dict:
    """The report's `targets` part from the finished runs (a target or method with no finished run is left out)."""
    targets = {}
    for target in settings.targets:
        before = log.get(f"{target}/before")
        runs, selections = {}, {}
        for method in settings.methods:
            for selection_seed in settings.selection_seeds(method):
                key = f"{target}/{method}/selection-{selection_seed}"
                if log.get(key) is not None:
                    selections.setdefault(method, []).append(log.get(key))
                for train_seed in range(settings.train_seeds):
                    if log.get(f"{key}/train-{train_seed}") is not None:
                        runs.setdefault(method, []).append(log.get(f"{key}/train-{train_seed}"))
        if runs:
            targets[target] = summarize_target(runs, selections, before)
    return targets


def selection_analysis(data: BenchmarkData, settings: Settings, cache: Path) -> dict:
    """What the saved score tables pick under each streaming rule (no training): per target and method, the
    GSM8K in-domain share, the source families and mean length of the rows, and the Jaccard overlap with exact
    Influence Distillation's rows under the same rule. It answers whether the per-target round-robin or the mean
    target score ("mean_top_k", the mean target gradient for first-order ID) picks differently."""
    budget = resolve_budget(settings.budget, len(data.pool))
    analysis = {}
    for target in settings.targets:
        picks = {}
        for method in settings.methods:
            folder = cache / "tables" / target / f"{method}-0"
            if not (folder / "provenance.json").exists():
                continue
            scores, row_ids, _ = ScoreTable.load(folder).to_matrix()
            for rule in ("round_robin", "mean_top_k"):
                chosen = select_indices(scores, budget, rule=rule, seed=0)
                picks[(method, rule)] = [row_ids[i] for i in chosen.tolist()]
        rows = {}
        for (method, rule), selected in picks.items():
            reference = set(picks.get(("influence_distillation_exact", rule), []))
            rows.setdefault(method, {})[rule] = {
                **describe_selection(data.pool, selected),
                "jaccard_vs_exact": len(reference & set(selected)) / len(reference | set(selected)) if reference else None}
        analysis[target] = rows
    return analysis


# Short plot labels for the option=value parts of method variants (the JSON keeps the full names).
_LABELS = {"shortlist_factor=0": "no shortlist", "kernel_bandwidth=null": "LOO bandwidth", "kernel_ridge=null": "LOO ridge",
           "selection=mean_top_k": "mean top-k", "landmark_features=jvp+lm": "JVP+LM features"}


def plot_label(method: str) -> str:
    """"ID" for influence_distillation, its variant options in words: "ID, k=512, no shortlist"."""
    name, _, options = method.partition(":")
    parts = [name.replace("influence_distillation", "ID")]
    for option in filter(None, options.split(",")):
        parts.append("k=" + option.split("=", 1)[1] if option.startswith("num_landmarks=") else _LABELS.get(option, option))
    return ", ".join(parts)


def plot(targets: dict, path: Path) -> None:
    """One panel per target, methods down the side: each method's mean loss change with its 95% interval;
    random's mean and +-2 std band behind them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(report["methods"]) for report in targets.values())
    figure, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets) + 2.5, 1.2 + 0.32 * rows), squeeze=False,
                                sharey=True)
    for column, (axis, (target, report)) in enumerate(zip(axes[0], targets.items())):
        names = list(report["methods"])
        means = [report["methods"][m]["loss_change_mean"] for m in names]
        errors = [[0.0, 0.0] if report["methods"][m]["loss_change_ci95"] is None else
                  [means[i] - report["methods"][m]["loss_change_ci95"][0],
                   report["methods"][m]["loss_change_ci95"][1] - means[i]] for i, m in enumerate(names)]
        if "random" in report["methods"]:
            random = report["methods"]["random"]
            axis.axvline(random["loss_change_mean"], color="grey", linestyle="--", linewidth=1, label="random mean")
            axis.axvspan(random["loss_change_mean"] - 2 * random["loss_change_std"],
                         random["loss_change_mean"] + 2 * random["loss_change_std"], color="grey", alpha=0.15,
                         label="random ± 2 std")
        axis.errorbar(means, range(len(names)), xerr=np.array(errors).T, fmt="o", capsize=3)
        if column == 0:  # the panels share the methods' order and axis
            axis.set_yticks(range(len(names)), [plot_label(m) for m in names])
            axis.invert_yaxis()
        axis.set_title(f"{target} (loss before {report['loss_before']:.3f})", fontsize=10)
        axis.set_xlabel("held-out loss change (lower is better)", fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    figure.suptitle("LoRA SFT on each selection: mean and 95% interval over selection and training seeds", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_table(targets: dict) -> None:
    print(f"\n{'target':<7}{'method':<30}{'change':>9}{'95% CI':>20}{'vs random':>10}{'95% CI':>20}{'sd':>6}"
          f"{'select s':>9}{'train s':>8}")
    for target, report in targets.items():
        for method, row in report["methods"].items():
            ci = "" if row["loss_change_ci95"] is None else "[{:+.4f}, {:+.4f}]".format(*row["loss_change_ci95"])
            diff = row.get("diff_vs_random_ci95")
            diff_ci = "" if diff is None else "[{:+.4f}, {:+.4f}]".format(*diff)
            sd = row.get("sd_below_random")
            print(f"{target:<7}{method:<30}{row['loss_change_mean']:>+9.4f}{ci:>20}"
                  f"{'' if 'diff_vs_random_mean' not in row else format(row['diff_vs_random_mean'], '+.4f'):>10}"
                  f"{diff_ci:>20}{'' if sd is None else f'{sd:.1f}':>6}"
                  f"{row['selection_seconds']:>9.0f}{row['train_seconds']:>8.0f}")


def markdown_table(targets: dict) -> str:
    """The README table: per target and method, the loss change and the paired difference against random with
    their 95% intervals, random's standard deviations below random's mean, and the seconds."""
    def interval_text(ci):
        return "" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"

    lines = ["| target | method | loss change (95% CI) | vs random, paired (95% CI) | sd below random | runs | "
             "select s | train s |", "|---|---|---|---|---|---|---|---|"]
    for target, report in targets.items():
        for method, row in report["methods"].items():
            sd = row.get("sd_below_random")
            diff = "" if "diff_vs_random_mean" not in row else (
                f"{row['diff_vs_random_mean']:+.3f} {interval_text(row['diff_vs_random_ci95'])}")
            lines.append(f"| {target} | {method} | {row['loss_change_mean']:+.3f} {interval_text(row['loss_change_ci95'])}"
                         f" | {diff} | {'' if sd is None else f'{sd:.1f}'} | {len(row['runs'])} | "
                         f"{row['selection_seconds']:.0f} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="stores, score tables and finished runs")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="PNG with one panel per target (needs matplotlib)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--quick", action="store_true",
                        help="development: GSM8K only, 2 random draws, 2 training seeds (a subset of the full run's runs)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the JSON / plot from the finished runs in --cache, running nothing (a partial "
                             "report says which runs are missing)")
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS),
                        help="run (and report) only these targets, e.g. a variant measured on one target")
    parser.add_argument("--methods", nargs="+", help=f"registry methods ({', '.join(METHODS)}) or variants "
                        "method:option=value,... (see parse_method); default: the registry methods")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found")
        return 0
    settings = Settings()
    if args.quick:
        settings = replace(settings, targets=("gsm8k",), random_seeds=2, train_seeds=2)
    if args.targets:
        settings = replace(settings, targets=tuple(args.targets))
    if args.methods:
        for name in args.methods:
            parse_method(name)  # an unknown method or a malformed option fails here, before any model pass
        settings = replace(settings, methods=tuple(args.methods))
    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    data = load_data(args.data_dir, settings)
    if args.report_only:
        log = RunLog(args.cache / "runs.json", settings)
    else:
        log = run_benchmark(data, settings, args.cache, lambda: load_model(DEFAULT_MODEL))
    targets = summarize(log, settings)
    planned = [f"{t}/{m}/selection-{s}/train-{r}" for t in settings.targets for m in settings.methods
               for s in settings.selection_seeds(m) for r in range(settings.train_seeds)]
    finished = [key for key in planned if log.get(key) is not None]
    runs = [log.get(key) for key in finished]
    selections = {key.rsplit("/", 1)[0] for key in finished}
    report = {"targets": targets, "settings": log.data["settings"], "pool_rows": len(data.pool),
              "selection_seconds_note": "wall seconds of select_by_influence with the stores already in --cache/work: "
                                        "a store another method or target built (or one copied in) is not "
                                        "counted again, so these are marginal costs, not standalone ones",
              "complete": len(finished) == len(planned), "runs_finished": len(finished), "runs_planned": len(planned),
              "train_seconds_total": sum(run["train_seconds"] for run in runs),
              "selection_seconds_total": sum(log.get(key)["selection_seconds"] for key in selections),
              "pool_in_domain_share_gsm8k": in_domain_share(data.pool["source"]),
              "budget_rows": resolve_budget(settings.budget, len(data.pool)),
              "evaluation_rows": {name: len(rows[1]) for name, rows in data.targets.items()},
              "machine": machine(), "seconds_this_invocation": time.perf_counter() - started}
    report["selection_analysis"] = selection_analysis(data, settings, args.cache)
    print_table(targets)
    print("\n" + markdown_table(targets))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(targets, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
