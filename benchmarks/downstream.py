"""Does the selection help training? The downstream benchmark of record, version 2: LoRA SFT on each method's
selection from a fresh pool slice, the change of the answer-token loss (and MMLU accuracy) on fresh evaluation
rows, with intervals over selection draws. Version 1 (benchmarks/results/downstream_cpu.json, kept as history) is
this file's git history.

    python benchmarks/downstream.py --cache runs/downstream_v2 --json benchmarks/results/downstream_v2_cpu.json \
        --runs benchmarks/results/downstream_v2_runs.json [--plot benchmarks/results/downstream_v2_cpu.png] \
        [--targets gsm8k ...] [--report-only]

PRE-REGISTRATION (committed before the first result; a cache records the commit that held it and the sha256 of
this text, and a resume under another text is refused)

Data, fresh: nothing here was used by any earlier benchmark, lab or test to choose a setting.
- Earlier uses: every earlier pool slice (downstream v1, the fidelity lab, selection_quality, selection_speed,
  nn_cift) is a prefix of at most 4,096 rows of the pool's seed-0 shuffle, and every earlier target draw is a
  prefix of load_target's seed-0 draw of its file (limits <= 340, nn_cift's), or v1's evaluation sample, or
  selection_quality's GSM8K sample (<= 32 rows). Excluded: the first 16,384 pool rows of that shuffle (and every
  pool row whose prompt is one of theirs), the first 512 rows of each target file's seed-0 draw, every MMLU dev
  row, v1's evaluation rows and the first 512 rows of selection_quality's GSM8K order.
- Pool: 4,096 rows drawn with seed 2026 from the rest, max_length 256 (prompts cut from the left).
- Targets (three, each with 100 selection rows and 200 evaluation rows, disjoint by id and prompt, drawn with
  seed 2026 / 2027 from the rest): GSM8K (selection: train problems with worked solutions; evaluation: test
  problems), MMLU (both from the test split: the dev split was used up by earlier benchmarks), BBH (one file).
- The overlap check (pool and target rows against every earlier use, by id and by prompt; selection against
  evaluation rows; evaluation prompts found in the pool) is computed on every run and written to the JSON.

Scoring: what is scored is the answer.
- answer loss: per evaluation row, the mean cross-entropy of the completion's own tokens (tokenised alone) after
  the chat-templated prompt with its generation prompt: no template token is scored. The mean over rows. The
  change is after - before (the base model): negative is better.
- MMLU accuracy: the choice letter (A-D) with the highest next-token likelihood after the prompt.

Methods (the library's registry names and defaults, budget 104 rows = 2.5% of the pool):
- random (5 draws: selection_seed 0-4);
- exact: influence_distillation_exact;
- default: influence_distillation with the library's defaults (landmarks + exact re-rank of a shortlist, bounded
  by exact_gradient_fraction 0.14: 573 exact gradients at most);
- paper: the paper's landmark ID, influence_distillation with shortlist_factor=0 (its landmarks then take the
  whole bound: 573 landmarks, the regression alone decides);
- control: the cost-matched control: as many pool rows as the default's draw took exact gradients, drawn
  uniformly (seed = draw), the budget chosen among them by exact ID's scores of that draw and its rule;
- less; rds (RDS+); nn_cift (its defaults: oracle exact ID, block 5% of the rows x 5% of the 100 targets).
Draws: every method with randomness in its selection gets 3 draws d = 0, 1, 2 with selection_seed = warmup_seed
= nn_cift_seed = d (the warm-up seed changes every gradient: exact and LESS get a new pass per draw); random gets
5; RDS+ (deterministic) 1 draw. Each draw is trained once with training seed d, RDS+'s draw with seeds 0, 1, 2.
Training: a fresh SmolLM2-135M-Instruct, LoRA r 8 (alpha 16) on all linear layers, AdamW lr 5e-4 constant, batch 8,
one epoch over the 104 selected rows (13 steps), the library's formatting (prompt masked, max_length 256),
transformers.Trainer.

Statistics, per target and method: the mean over draws of each draw's mean change; a 95% interval by a
hierarchical bootstrap (10,000 resamples, seed 0: draws with replacement, then each drawn draw's training runs with
replacement); differences against random, exact and RDS+ by independent bootstraps of the two methods; the effect
size against random in random's standard deviations (the sd of random's 5 draws' changes).

Decision rules, per target:
- a method helps when its difference against random has a 95% interval entirely below 0;
- "default >= 2 sd better than random": (random mean - default mean) >= 2 x random's sd;
- "default not worse than RDS+": the default - RDS+ interval is not entirely above 0;
- "default within exact ID's interval" (the cheap default matches exact): the default - exact interval holds 0.
Headline claim, true only if the table says so: the default is >= 2 sd better than random on >= 2 of the 3
targets and not worse than RDS+ on any. README's claims follow the table.

Cost (estimated before the run, 2-core CPU): an exact gradient pass ~75 min per draw (x 3), JVP + bounded
gradients ~25 min per draw, RDS+ ~30 min, 78 training runs ~2.5 min each: ~9 CPU hours, over several sessions
(resumable). The issue's "about two hours" does not fit 3 exact passes over 4,096 rows on this machine.

END OF PRE-REGISTRATION

Resumable: each selection (its record in the runs log, its ScoreTable in CACHE/tables) and each training run is
kept, the log rewritten atomically after every run; a rerun does only what is missing and gives the same result.
The runs log (--runs, default CACHE/runs.json) holds everything the report reads (selected row ids, answer
metrics, seconds): the benchmark of record keeps it in benchmarks/results/downstream_v2_runs.json, committed as it
grows, so a fresh checkout without the cache resumes where the last one stopped.
Model-side stores live in CACHE/work/draw-<d>, shared by the methods of a draw and by the three targets. Runs are
made draw by draw, method by method (a method's selections for all three targets, then their training runs), so
a draw's stores are built once and used up before the next draw's, and a method's `selection_seconds` is
marginal (a store another method or target built is read, not recomputed): the JSON keeps each selection's stage
seconds beside it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
import torch
from answer_eval import answer_metrics
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from selection_quality import DEFAULT_DATA_DIR, in_domain_share, machine
from transformers import Trainer, TrainingArguments

from hf_influence import DEFAULT_MODEL, ScoreTable, load_model, load_target, select_by_influence
from hf_influence.data import load_rows, sample_rows
from hf_influence.formatting import FormattingConfig, format_dataset, pad_batch
from hf_influence.selection.rules import select_indices
from hf_influence.extraction.store import atomic_write_json

SCRIPT = Path(__file__).resolve()
# Target name -> (load_target task, options of the selection rows' file, of the evaluation rows' file).
TARGETS = {
    "gsm8k": ("gsm8k", {}, {"held_out": True}),
    "mmlu": ("mmlu", {"held_out": True}, {"held_out": True}),
    "bbh": ("bbh", {}, {}),
}
CHOICES = {"mmlu": ("A", "B", "C", "D")}


@dataclass(frozen=True)
class Method:
    """A row of the table: a registry method with options (None: derived, see `control_selection`), and how many
    selection draws and training seeds per draw it gets (`select` says which seeds a draw sets)."""

    registry: str | None
    options: dict = field(default_factory=dict)
    draws: int = 3
    train_seeds: int = 1


# In the order a draw runs them: RDS+ (draw 0 only) before exact ID's long pool pass, so that a session too short
# for that pass still finishes it; the control, LESS and NN-CIFT after exact ID, whose table and pool gradients
# they read.
METHODS = {
    "random": Method("random", draws=5),
    "default": Method("influence_distillation"),
    "paper": Method("influence_distillation", {"shortlist_factor": 0}),
    "rds": Method("rds", draws=1, train_seeds=3),
    "exact": Method("influence_distillation_exact"),
    "control": Method(None),
    "less": Method("less"),
    "nn_cift": Method("nn_cift"),
}
# Settings that only say how many runs to make: a rerun may extend or shrink them.
EXTENTS = ("targets", "methods")


@dataclass
class Settings:
    """Everything that defines the benchmark (the pre-registered values). The fields other than EXTENTS are stored
    with the results, and a rerun on a cache made with other values is refused."""

    pool_rows: int = 4096
    max_length: int = 256
    selection_rows: int = 100
    eval_rows: int = 200
    budget: int = 104
    batch_size: int = 8
    epochs: float = 1.0
    learning_rate: float = 5e-4
    lora_r: int = 8
    seed: int = 2026
    bootstrap_resamples: int = 10_000
    excluded_pool_prefix: int = 16_384
    excluded_target_prefix: int = 512
    targets: tuple[str, ...] = tuple(TARGETS)
    methods: tuple[str, ...] = tuple(METHODS)
    # Extra select_by_influence options (the tests make the tiny model's runs fast with them).
    options: dict = field(default_factory=dict)
    # Method rows: the tests shrink draws; the benchmark uses METHODS.
    method_table: dict = field(default_factory=lambda: dict(METHODS))


def preregistration(text: str | None = None) -> str:
    """The pre-registered part of a docstring (default: this module's)."""
    text = __doc__ if text is None else text
    return text[text.index("PRE-REGISTRATION"):text.index("END OF PRE-REGISTRATION")]


def preregistered_commit(script: Path = SCRIPT, text: str | None = None) -> dict:
    """The pre-registration's record: the first commit of `script` (whose docstring is `text`; default this module)
    that held this pre-registration text, whether the working copy of the script differs from its last commit (a
    new cache is then refused), and the text's sha256."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=script.parent, capture_output=True, text=True).stdout.strip()

    sha256 = hashlib.sha256(preregistration(text).encode()).hexdigest()
    # The first commit whose copy of the script holds this text: later commits may change the script outside it.
    commit = None
    for candidate in git("log", "--reverse", "--format=%H", "--", script.name).split():
        held = git("show", f"{candidate}:./{script.name}")
        if "END OF PRE-REGISTRATION" in held and \
                hashlib.sha256(preregistration(held).encode()).hexdigest() == sha256:
            commit = candidate
            break
    dirty = bool(git("status", "--porcelain", "--", script.name))
    return {"commit": commit, "uncommitted_changes": dirty, "sha256": sha256}


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class BenchmarkData:
    pool: Dataset  # raw pool rows, with `source`
    targets: dict[str, tuple[Dataset, Dataset]]  # name -> (selection rows, evaluation rows)
    overlap_check: dict = field(default_factory=dict)


def pool_prompts(pool: Dataset) -> list[str]:
    """Each pool row's first user message (the prompt it is compared by)."""
    return [next(message["content"] for message in messages if message["role"] == "user")
            for messages in pool["messages"]]


# Version 1's targets: load_target options of its 32 selection rows and of its 64 evaluation rows' candidates.
V1_TARGETS = {"gsm8k": ({}, {"held_out": True}), "mmlu": ({}, {"held_out": True}), "bbh": ({}, {})}


@functools.lru_cache(maxsize=None)
def target_file(data_dir: Path, task: str, held_out: bool = False) -> Dataset:
    """Every row of a target file, as load_target gives them (read once: a seeded draw of `limit` rows is
    sample_rows(target_file(...), limit, seed), the rows load_target(..., limit=limit, seed=seed) gives)."""
    return load_target(task, data_dir=data_dir, held_out=held_out)


def earlier_target_rows(data_dir: Path, prefix: int) -> tuple[set[str], set[str], list[str]]:
    """Ids and prompts of every target row an earlier benchmark, lab or test could have used (see the
    pre-registration), and what was checked."""
    ids, prompts, checked = set(), set(), []

    def add(rows: Dataset, what: str) -> None:
        ids.update(rows["id"])
        prompts.update(rows["prompt"])
        checked.append(f"{what}: {len(rows)} rows")

    for task, held_out in (("gsm8k", False), ("gsm8k", True), ("mmlu", False), ("mmlu", True), ("bbh", False)):
        add(sample_rows(target_file(data_dir, task, held_out), prefix, 0),
            f"load_target({task!r}, held_out={held_out}) seed-0 prefix")
    add(target_file(data_dir, "mmlu"), "every MMLU dev row")
    for task, (selection_options, evaluation_options) in V1_TARGETS.items():
        selection = sample_rows(target_file(data_dir, task, **selection_options), 32, 0)
        candidates = target_file(data_dir, task, **evaluation_options)
        add(sample_rows(without(candidates, set(selection["id"]), set(selection["prompt"])), 64, 1),
            f"downstream v1 {task} evaluation rows")
    gsm8k_test = load_rows(data_dir / "targets" / "gsm8k_test.jsonl.gz").shuffle(seed=0)
    add(gsm8k_test.select(range(min(prefix, len(gsm8k_test)))), "selection_quality / selection_speed GSM8K prefix")
    return ids, prompts, checked


def without(rows: Dataset, ids: set[str], prompts: set[str]) -> Dataset:
    """`rows` minus every row whose id is in `ids` or whose prompt is in `prompts`."""
    return rows.select([i for i, (row_id, prompt) in enumerate(zip(rows["id"], rows["prompt"]))
                        if row_id not in ids and prompt not in prompts])


def draw_rows(candidates: Dataset, rows: int, seed: int) -> Dataset:
    """`rows` rows drawn from `candidates` with `seed`; an error when fewer are left."""
    if len(candidates) < rows:
        raise ValueError(f"only {len(candidates)} rows are left after removing the excluded rows; asked for {rows}")
    return sample_rows(candidates, rows, seed)


def load_data(data_dir: Path, settings: Settings) -> BenchmarkData:
    """The fresh pool slice and, per target, its selection and evaluation rows, with the overlap check."""
    order = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=0)
    used = order.select(range(settings.excluded_pool_prefix))
    used_ids, used_prompts = set(used["id"]), set(pool_prompts(used))
    rest = order.select(range(settings.excluded_pool_prefix, len(order)))
    keep = [i for i, prompt in enumerate(pool_prompts(rest)) if prompt not in used_prompts]
    pool = draw_rows(rest.select(keep), settings.pool_rows, settings.seed)
    target_ids, target_prompts, checked = earlier_target_rows(data_dir, settings.excluded_target_prefix)
    targets = {}
    for name in settings.targets:
        task, selection_options, evaluation_options = TARGETS[name]
        selection = draw_rows(without(target_file(data_dir, task, **selection_options), target_ids, target_prompts),
                              settings.selection_rows, settings.seed)
        candidates = without(target_file(data_dir, task, **evaluation_options), target_ids, target_prompts)
        evaluation = draw_rows(without(candidates, set(selection["id"]), set(selection["prompt"])),
                               settings.eval_rows, settings.seed + 1)
        targets[name] = selection, evaluation
    data = BenchmarkData(pool, targets)
    data.overlap_check = overlap_check(data, used_ids, used_prompts, target_ids, target_prompts, checked)
    return data


def overlap_check(data: BenchmarkData, earlier_ids: set, earlier_prompts: set, target_ids: set, target_prompts: set,
                  checked: list[str]) -> dict:
    """Counts of shared rows, by id and by prompt: pool against the earlier pool rows, each target's rows against
    every earlier target use and each other; evaluation prompts that are also pool prompts (contamination: reported,
    not removed). `clean` is True when every count but the contamination is 0."""
    in_pool = set(pool_prompts(data.pool))
    report = {"pool": {"rows": len(data.pool), "earlier_pool_rows_excluded": len(earlier_ids),
                       "by_id": len(set(data.pool["id"]) & earlier_ids), "by_prompt": len(in_pool & earlier_prompts)},
              "earlier_target_uses": checked, "targets": {}}
    counts = [report["pool"]["by_id"], report["pool"]["by_prompt"]]
    for name, (selection, evaluation) in data.targets.items():
        record = {"selection_rows": len(selection), "evaluation_rows": len(evaluation)}
        for part, rows in (("selection", selection), ("evaluation", evaluation)):
            record[f"{part}_earlier_by_id"] = len(set(rows["id"]) & target_ids)
            record[f"{part}_earlier_by_prompt"] = len(set(rows["prompt"]) & target_prompts)
        record["selection_evaluation_by_id"] = len(set(selection["id"]) & set(evaluation["id"]))
        record["selection_evaluation_by_prompt"] = len(set(selection["prompt"]) & set(evaluation["prompt"]))
        counts += [value for key, value in record.items() if "_by_" in key]
        record["evaluation_prompts_in_pool"] = len(set(evaluation["prompt"]) & in_pool)
        report["targets"][name] = record
    report["clean"] = not any(counts)
    return report


# ----------------------------------------------------------------------------------------------------- the runs


class RunLog:
    """A JSON object of finished results, rewritten atomically after every change (crash-safe resume), made under
    one pre-registration and one set of settings."""

    def __init__(self, path: Path, settings: Settings, registration: dict):
        self.path = path
        recorded = settings_record(settings)
        if path.exists():
            self.data = json.loads(path.read_text())
            if self.data["preregistration"]["sha256"] != registration["sha256"]:
                raise ValueError(f"{path} was made under another pre-registration text (sha256 "
                                 f"{self.data['preregistration']['sha256'][:12]}); use another --cache")
            made_with = self.data["settings"]
            if made_with != recorded:
                changed = sorted(key for key in recorded if made_with.get(key) != recorded[key])
                raise ValueError(f"{path} was made with other settings ({', '.join(changed)} differ); use another "
                                 f"--cache or the same settings")
        else:
            self.data = {"preregistration": registration, "settings": recorded, "results": {}}

    def get(self, key: str):
        return self.data["results"].get(key)

    def put(self, key: str, value) -> None:
        self.data["results"][key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)


def settings_record(settings: Settings) -> dict:
    record = {key: value for key, value in asdict(settings).items() if key not in (*EXTENTS, "method_table")}
    record["method_table"] = {name: asdict(method) for name, method in settings.method_table.items()}
    return json.loads(json.dumps(record))


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def describe_selection(pool: Dataset, row_ids: list[int]) -> dict:
    """What the selected rows look like: source families (the part before '/') and mean characters per row."""
    rows = pool.select(row_ids)
    families = Counter(source.split("/")[0] for source in rows["source"])
    characters = [sum(len(m["content"]) for m in messages) for messages in rows["messages"]]
    return {"in_domain_share_gsm8k": in_domain_share(rows["source"]), "source_families": dict(families),
            "mean_characters": float(np.mean(characters))}


def select(data: BenchmarkData, target: str, method: str, draw: int, settings: Settings, cache: Path,
           model_loader: Callable) -> dict:
    """One selection draw of a registry method through `select_by_influence` (stores in cache/work/draw-<draw>);
    its ScoreTable goes to cache/tables/<target>/<method>-<draw>."""
    spec = settings.method_table[method]
    # random reads no model: loading one per draw would only cost time
    model, tokenizer = (None, None) if spec.registry == "random" else model_loader()
    options = {"selection_seed": draw}
    if spec.registry != "random":  # random reads no model and keeps no store
        options.update(max_length=settings.max_length, work_dir=str(cache / "work" / f"draw-{draw}"),
                       show_progress=False, **settings.options, **spec.options)
    if spec.registry not in ("random", "rds"):  # the methods whose gradients come from the warm-up's model
        options.update(warmup_seed=draw, warmup_show_progress=False)
    if spec.registry == "nn_cift":
        options["nn_cift_seed"] = draw
    start = time.perf_counter()
    _, table = select_by_influence(data.pool, data.targets[target][0], model=model, tokenizer=tokenizer,
                                   budget=settings.budget, method=spec.registry, return_scores=True, **options)
    seconds = time.perf_counter() - start
    table.save(cache / "tables" / target / f"{method}-{draw}")
    row_ids = table.provenance["selected_pool_row_ids"]
    details = table.provenance.get("details", {})
    return {"selected_pool_row_ids": row_ids, "selection_seconds": seconds, "stage_seconds": details.get("seconds"),
            "exact_gradients": details.get("exact_gradients"), **describe_selection(data.pool, row_ids)}


def control_selection(data: BenchmarkData, target: str, draw: int, settings: Settings, cache: Path,
                      default: dict) -> dict:
    """The cost-matched control of a draw: as many uniformly drawn pool rows (seed = draw) as the default's draw
    took exact gradients, the budget chosen among them by exact ID's scores of the same draw, with exact ID's rule
    (no model pass: exact ID's scores of a row do not depend on the other rows)."""
    rows = default["exact_gradients"]["exact_gradient_rows"]
    exact = ScoreTable.load(cache / "tables" / target / f"exact-{draw}")
    scores, row_ids, _ = exact.to_matrix()
    uniform = torch.randperm(len(row_ids), generator=torch.Generator().manual_seed(draw))[:rows].sort().values
    rule = exact.provenance["selection"]
    chosen = select_indices(scores[uniform], settings.budget, rule=rule, seed=draw)
    selected = [row_ids[i] for i in uniform[chosen].tolist()]
    return {"selected_pool_row_ids": selected, "selection_seconds": 0.0, "uniform_rows": rows, "rule": rule,
            **describe_selection(data.pool, selected)}


def train(data: BenchmarkData, target: str, row_ids: list[int], train_seed: int, settings: Settings, cache: Path,
          model_loader: Callable) -> dict:
    """LoRA SFT of a fresh model on the selected pool rows; the evaluation rows' answer metrics after."""
    model, tokenizer = model_loader()
    torch.manual_seed(train_seed)  # the LoRA initialisation
    model = get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    formatted = format_dataset(data.pool.select(row_ids), tokenizer, FormattingConfig(max_length=settings.max_length),
                               show_progress=False).dataset.select_columns(["input_ids", "labels"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    arguments = TrainingArguments(
        output_dir=str(cache / "trainer"), per_device_train_batch_size=settings.batch_size,
        num_train_epochs=settings.epochs, learning_rate=settings.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, seed=train_seed, data_seed=train_seed, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=arguments, train_dataset=formatted,
                      data_collator=lambda rows: pad_batch(rows, pad))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    after = answer_metrics(model, tokenizer, data.targets[target][1], settings.max_length, CHOICES.get(target))
    return {"train_seed": train_seed, **{f"{key}_after": value for key, value in after.items()},
            "train_seconds": seconds, "train_loss": result.training_loss, "steps": result.global_step}


def planned(settings: Settings) -> list[tuple[str, str, int, int]]:
    """(target, method, draw, training seed) of every run, in the order they are made: draw by draw (the draw's
    model-side stores serve every target before the next draw's are built), the methods of a draw in table order
    (METHODS: the control after the default and exact, whose records it reads), each method for every target
    (`run_benchmark` makes all of a draw's selections before its training runs)."""
    runs = []
    for draw in range(max(settings.method_table[m].draws for m in settings.methods)):
        for method in settings.methods:
            spec = settings.method_table[method]
            if draw < spec.draws:
                for target in settings.targets:
                    runs += [(target, method, draw, seed) for seed in
                             (range(spec.train_seeds) if spec.train_seeds > 1 else (draw,))]
    return runs


def registry_or_control(data: BenchmarkData, target: str, method: str, draw: int, settings: Settings, cache: Path,
                        model_loader: Callable, log: RunLog) -> dict:
    """This benchmark's selections: the control from the default's draw, every other row through the registry."""
    if settings.method_table[method].registry is None:
        if not (cache / "tables" / target / f"exact-{draw}").exists():
            # a fresh checkout resuming from a committed runs log: exact ID's table of this draw is remade (the same
            # table: the selection is deterministic), its record already logged stays as it is
            select(data, target, "exact", draw, settings, cache, model_loader)
        return control_selection(data, target, draw, settings, cache, log.get(f"{target}/default/draw-{draw}"))
    return select(data, target, method, draw, settings, cache, model_loader)


def run_benchmark(data: BenchmarkData, settings: Settings, cache: Path, model_loader: Callable,
                  registration: dict | None = None, selector: Callable = registry_or_control,
                  runs: Path | None = None) -> RunLog:
    """Every missing selection (made by `selector`, with registry_or_control's arguments) and training run (a
    finished one is never redone), logged in `runs` (default cache/runs.json)."""
    log = RunLog(runs or cache / "runs.json", settings, registration or preregistered_commit())
    for _, group in itertools.groupby(planned(settings), key=lambda run: run[2]):
        group = list(group)
        # Every selection of a draw before any of its training runs: selections read the draw's pool stores (lost
        # with the cache when a session ends), training runs only the runs log, so a session that ends among the
        # training runs leaves none that needs the stores rebuilt.
        for target, method, draw in dict.fromkeys(run[:3] for run in group):
            if log.get(f"{target}/before") is None:
                model, tokenizer = model_loader()
                log.put(f"{target}/before", answer_metrics(model, tokenizer, data.targets[target][1],
                                                           settings.max_length, CHOICES.get(target)))
            key = f"{target}/{method}/draw-{draw}"
            if log.get(key) is None:
                _log(f"select {key}")
                log.put(key, selector(data, target, method, draw, settings, cache, model_loader, log))
        for target, method, draw, train_seed in group:
            key = f"{target}/{method}/draw-{draw}"
            run_key = f"{key}/train-{train_seed}"
            if log.get(run_key) is None:
                record = train(data, target, log.get(key)["selected_pool_row_ids"], train_seed, settings, cache,
                               model_loader)
                log.put(run_key, record)
                change = record["answer_loss_after"] - log.get(f"{target}/before")["answer_loss"]
                _log(f"{run_key}: answer loss change {change:+.4f} ({record['train_seconds']:.0f} s)")
    return log


# --------------------------------------------------------------------------------------------------- statistics


def bootstrap_means(groups: list[list[float]], resamples: int, seed: int) -> np.ndarray:
    """[resamples] hierarchical bootstrap means of two-level data: draw len(groups) groups (selection draws) with
    replacement, then within each drawn group its values (training runs) with replacement; the mean of the drawn
    groups' means."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))
    means = np.zeros(resamples)
    for column in range(len(groups)):
        group_means = np.empty(resamples)
        for index, values in enumerate(groups):
            rows = picks[:, column] == index
            draws = rng.integers(0, len(values), size=(int(rows.sum()), len(values)))
            group_means[rows] = np.asarray(values, dtype=np.float64)[draws].mean(axis=1)
        means += group_means
    return means / len(groups)


def interval(samples: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap samples."""
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def draw_means(groups: list[list[float]]) -> list[float]:
    """Each selection draw's mean over its training runs."""
    return [float(np.mean(values)) for values in groups]


def summarize_target(groups: dict[str, list[list[float]]], resamples: int) -> dict:
    """Per method, from its values grouped by selection draw (one list of training runs per draw): the mean of the
    draws' means, its interval, the differences against random, exact and RDS+ (independent bootstraps, each
    method's seeded by its name), and the effect size against random in random's sd over its draws."""
    boot = {method: bootstrap_means(values, resamples, seed=int(hashlib.sha256(method.encode()).hexdigest()[:8], 16))
            for method, values in groups.items()}
    random_sd = float(np.std(draw_means(groups["random"]), ddof=1)) if len(groups.get("random", [])) > 1 else None
    report = {}
    for method, values in groups.items():
        mean = float(np.mean(draw_means(values)))
        record = {"mean": mean, "ci95": interval(boot[method]), "selections": len(values),
                  "train_seeds": sorted({len(v) for v in values})}
        for other in ("random", "exact", "rds"):
            if other in groups and other != method:
                record[f"vs_{other}_mean"] = mean - float(np.mean(draw_means(groups[other])))
                record[f"vs_{other}_ci95"] = interval(boot[method] - boot[other])
        if random_sd and method != "random":
            record["effect_size_vs_random"] = record["vs_random_mean"] / random_sd
        report[method] = record
    return {"methods": report, "random_sd": random_sd}


def summarize(log: RunLog, settings: Settings) -> dict:
    """The report's `targets` part from the finished runs (methods with no finished run are left out)."""
    targets = {}
    for target in settings.targets:
        before = log.get(f"{target}/before")
        if before is None:
            continue
        metrics = {"loss_change": lambda run: run["answer_loss_after"] - before["answer_loss"]}
        if "accuracy" in before:
            metrics["accuracy"] = lambda run: run["accuracy_after"]
        grouped: dict[str, dict[str, list[list[float]]]] = {name: {} for name in metrics}
        selections, runs = {}, {}
        for t, method, draw, seed in planned(replace(settings, targets=(target,))):
            record = log.get(f"{t}/{method}/draw-{draw}/train-{seed}")
            if record is None:
                continue
            if log.get(f"{t}/{method}/draw-{draw}") not in selections.setdefault(method, []):
                selections[method].append(log.get(f"{t}/{method}/draw-{draw}"))
            runs.setdefault(method, []).append({"draw": draw, **record})
            for name, value in metrics.items():
                draws = grouped[name].setdefault(method, {})
                draws.setdefault(draw, []).append(value(record))
        tables = {name: summarize_target({m: list(d.values()) for m, d in by_method.items()},
                                         settings.bootstrap_resamples) for name, by_method in grouped.items()}
        methods = {}
        for method in runs:
            loss = tables["loss_change"]["methods"][method]
            row = {"loss_change_mean": loss["mean"], "loss_change_ci95": loss["ci95"],
                   **{key: value for key, value in loss.items() if key.startswith(("vs_", "effect"))},
                   "selections": loss["selections"], "train_seeds": loss["train_seeds"],
                   "selection_seconds": float(np.mean([s["selection_seconds"] for s in selections[method]])),
                   "train_seconds": float(np.mean([r["train_seconds"] for r in runs[method]])),
                   "runs": runs[method], "selection_records": selections[method]}
            if "accuracy" in tables:
                accuracy = tables["accuracy"]["methods"][method]
                row.update(accuracy_mean=accuracy["mean"], accuracy_ci95=accuracy["ci95"],
                           **{f"accuracy_{key}": value for key, value in accuracy.items() if key.startswith("vs_")})
            methods[method] = row
        targets[target] = {"before": before, "random_sd": tables["loss_change"]["random_sd"], "methods": methods,
                           "verdict": verdict(methods)}
    return targets


def verdict(methods: dict) -> dict:
    """The pre-registered decision rules on one target's rows (None where a row they need is missing)."""
    helps = {method: row["vs_random_ci95"][1] < 0 for method, row in methods.items() if "vs_random_ci95" in row}
    default = methods.get("default", {})
    effect = default.get("effect_size_vs_random")
    return {"helps_vs_random": helps,
            "default_2sd_better_than_random": None if effect is None else -effect >= 2,
            "default_not_worse_than_rds": None if "vs_rds_ci95" not in default else not default["vs_rds_ci95"][0] > 0,
            "default_within_exact_interval": None if "vs_exact_ci95" not in default else
            default["vs_exact_ci95"][0] <= 0 <= default["vs_exact_ci95"][1]}


def headline(targets: dict) -> dict:
    """The pre-registered headline claim over the targets: default >= 2 sd better than random on >= 2 of 3 and not
    worse than RDS+ on any (None until every target has both rows)."""
    verdicts = [report["verdict"] for report in targets.values()]
    if len(verdicts) < 3 or any(v["default_2sd_better_than_random"] is None or v["default_not_worse_than_rds"] is None
                                for v in verdicts):
        return {"holds": None, "targets_reported": len(verdicts)}
    better = sum(v["default_2sd_better_than_random"] for v in verdicts)
    return {"holds": better >= 2 and all(v["default_not_worse_than_rds"] for v in verdicts),
            "targets_2sd_better": better, "targets_reported": len(verdicts)}


# ------------------------------------------------------------------------------------------------------- output


def plot(targets: dict, path: Path) -> None:
    """One panel per target, methods down the side: each method's mean answer-loss change with its 95% interval;
    random's mean and +-2 sd band (sd over its draws) behind them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(report["methods"]) for report in targets.values())
    figure, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets) + 1.5, 1.2 + 0.34 * rows), squeeze=False,
                                sharey=True)
    for column, (axis, (target, report)) in enumerate(zip(axes[0], targets.items())):
        names = list(report["methods"])
        means = [report["methods"][m]["loss_change_mean"] for m in names]
        errors = [[means[i] - report["methods"][m]["loss_change_ci95"][0],
                   report["methods"][m]["loss_change_ci95"][1] - means[i]] for i, m in enumerate(names)]
        random, sd = report["methods"].get("random"), report["random_sd"]
        if random is not None and sd:
            axis.axvline(random["loss_change_mean"], color="grey", linestyle="--", linewidth=1, label="random mean")
            axis.axvspan(random["loss_change_mean"] - 2 * sd, random["loss_change_mean"] + 2 * sd, color="grey",
                         alpha=0.15, label="random ± 2 sd")
        axis.errorbar(means, range(len(names)), xerr=np.array(errors).T, fmt="o", capsize=3)
        if column == 0:
            axis.set_yticks(range(len(names)), names)
            axis.invert_yaxis()
        axis.set_title(f"{target} (answer loss before {report['before']['answer_loss']:.3f})", fontsize=10)
        axis.set_xlabel("answer-loss change (lower is better)", fontsize=9)
        axis.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    figure.suptitle("LoRA SFT on each selection: mean and 95% interval over selection draws", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_table(targets: dict) -> str:
    """README's table: per target and method, the answer-loss change, the differences against random and exact ID
    with their intervals, the effect size against random, MMLU accuracy, draws and seconds."""
    def text(mean, ci):
        return "" if mean is None else f"{mean:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"

    lines = ["| target | method | answer-loss change | vs random | vs exact ID | sd vs random | accuracy | draws | "
             "select s | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for target, report in targets.items():
        for method, row in report["methods"].items():
            effect = row.get("effect_size_vs_random")
            accuracy = "" if "accuracy_mean" not in row else (
                f"{row['accuracy_mean']:.3f} [{row['accuracy_ci95'][0]:.3f}, {row['accuracy_ci95'][1]:.3f}]")
            lines.append(f"| {target} | {method} | {text(row['loss_change_mean'], row['loss_change_ci95'])} | "
                         f"{text(row.get('vs_random_mean'), row.get('vs_random_ci95'))} | "
                         f"{text(row.get('vs_exact_mean'), row.get('vs_exact_ci95'))} | "
                         f"{'' if effect is None else f'{-effect:+.1f}'} | {accuracy} | {row['selections']} | "
                         f"{row['selection_seconds']:.0f} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def report(data: BenchmarkData, log: RunLog, settings: Settings, started: float) -> dict:
    targets = summarize(log, settings)
    plan = planned(settings)
    finished = [key for key in (f"{t}/{m}/draw-{d}/train-{s}" for t, m, d, s in plan) if log.get(key) is not None]
    selections = {key.rsplit("/", 1)[0] for key in finished}
    return {"targets": targets, "headline": headline(targets),
            "preregistered_commit": log.data["preregistration"]["commit"],
            "preregistration": log.data["preregistration"], "overlap_check": data.overlap_check,
            "settings": log.data["settings"], "complete": len(finished) == len(plan),
            "runs_finished": len(finished), "runs_planned": len(plan),
            "train_cpu_minutes": sum(log.get(key)["train_seconds"] for key in finished) / 60,
            "selection_cpu_minutes": sum(log.get(key)["selection_seconds"] for key in selections) / 60,
            "selection_seconds_note": "wall seconds of select_by_influence on the draw's shared stores: a store "
                                      "another method or target built is read, not recomputed (marginal costs; each "
                                      "selection's stage_seconds are in its record)",
            "pool_in_domain_share_gsm8k": in_domain_share(data.pool["source"]),
            "machine": machine(), "seconds_this_invocation": time.perf_counter() - started}


def run_registered(args: argparse.Namespace, settings: Settings, registration: dict, data_loader: Callable,
                   selector: Callable = registry_or_control, script: Path = SCRIPT) -> tuple[BenchmarkData, RunLog]:
    """A pre-registered benchmark's run: refuse to start a cache while `script` differs from its commit, load the
    fresh rows (`data_loader(data_dir, settings)`, refused if they overlap earlier uses), then run what is
    missing, or with --report-only read what is finished."""
    runs = args.runs or args.cache / "runs.json"
    if registration["uncommitted_changes"] and not runs.exists() and not args.allow_uncommitted:
        raise SystemExit(f"{script.name} differs from its last commit: commit the pre-registration before the first "
                         f"result (or pass --allow-uncommitted for a development cache)")
    data = data_loader(args.data_dir, settings)
    if not data.overlap_check["clean"]:
        raise SystemExit(f"the fresh rows overlap earlier uses: {json.dumps(data.overlap_check)}")
    if args.report_only:
        return data, RunLog(runs, settings, registration)
    return data, run_benchmark(data, settings, args.cache, lambda: load_model(DEFAULT_MODEL), registration, selector,
                               runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="stores, score tables and finished runs")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--runs", type=Path,
                        help="the runs log (default CACHE/runs.json); keep it in the repository to resume from a "
                             "fresh checkout")
    parser.add_argument("--plot", type=Path, help="PNG with one panel per target (needs matplotlib)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), help="run (and report) only these targets")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        help="run (and report) only these methods, e.g. the ones that need no model-side store "
                             "(random) when a session is too short for the next store (the control needs exact)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the JSON / plot from the finished runs in --cache, running nothing")
    parser.add_argument("--allow-uncommitted", action="store_true",
                        help="start a cache although this script differs from its last commit (development only: "
                             "the JSON then says the pre-registration was not committed)")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found")
        return 0
    settings = replace(Settings(), **{name: tuple(value) for name, value in
                                      (("targets", args.targets), ("methods", args.methods)) if value})
    started = time.perf_counter()
    data, log = run_registered(args, settings, preregistered_commit(), load_data)
    result = report(data, log, settings, started)
    print(markdown_table(result["targets"]))
    print(json.dumps(result["headline"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, result)
    if args.plot and result["targets"]:
        plot(result["targets"], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
