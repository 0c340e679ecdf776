"""Which gradient carries the signal? Exact Influence Distillation under one change at a time to the gradient
representation, judged by what LoRA SFT on its picks does to the answer loss of fresh evaluation rows, with
intervals over selection draws, against random, RDS+ and LESS, on three targets, one of them a task the library's
defaults were never tuned on. The machinery (training, answer scoring, hierarchical bootstrap, resumable run log)
is the downstream benchmark of record's (benchmarks/downstream.py); the rows are not its rows.

    python benchmarks/signal_study.py --cache runs/signal --json benchmarks/results/signal_cpu.json \
        --runs benchmarks/results/signal_runs.json [--plot benchmarks/results/signal_cpu.png] \
        [--configs default lora_mlp ...] [--report-only]

PRE-REGISTRATION (committed before the first result; the run log records the commit that held it and the sha256
of this text, and a resume under another text is refused)

Data, fresh and disjoint from every earlier use, the downstream benchmark of record (v2) included, so that a
default chosen here is still judged on rows it was not chosen on:
- Excluded: everything downstream v2 excludes (the first 16,384 pool rows of the seed-0 shuffle and their prompts,
  the first 512 rows of each target file's seed-0 draw, every MMLU dev row, v1's evaluation rows, the
  selection_quality GSM8K prefix), plus v2's 4,096 pool rows and its selection and evaluation rows (by id and
  prompt).
- Pool: 1,024 rows drawn with seed 2027 from the rest, max_length 256 (prompts cut from the left).
- Targets, each 100 selection rows and 200 evaluation rows (seeds 2028 / 2029), disjoint by id and prompt:
  GSM8K (train problems with worked solutions / test problems), MMLU (test split, both), and Code Alpaca, the task
  chosen before any result as one the library's defaults were never tuned on (no lab, benchmark or test chose a
  setting on code): its rows come from the pool file's codealpaca/ rows outside the pool slice (prompt = the user
  turn, completion = the assistant turn); the pool slice keeps its own Code Alpaca rows, as it keeps FLAN's
  GSM8K rows for GSM8K.

Configurations: exact ID (influence_distillation_exact), each a single change from the library's default
representation (LoRA r 8, alpha 16 on q/k/v/o; CountSketch to 8,192; unit-normalised per-sample gradients of the
mean response-token loss; an AdamW warm-up of 1 epoch on 5% of the pool at lr 2e-5 whose state preconditions the
pool gradients; first order):
- exact: the library default, as is;
- lora_mlp: LoRA on gate/up/down_proj; lora_all: on every linear layer of the blocks; rank_32: r 32, alpha 64;
- srht_32k: SRHT projection to 32,768;
- no_normalize: gradients not unit-normalised (each row's gradient of its mean response-token loss);
- token_sum: the gradient of the SUM of the response-token losses, not normalised: no_normalize's gradient times
  the row's response-token count, so its scores are no_normalize's scores times that count (derived, no pass);
- sgd: optimizer_state "warmup_gd" (the same warm-up moves the weights, then no Adam preconditioning: plain
  gradient descent's influence);
- warmup_4: a 4-epoch warm-up; checkpoints_4: LESS's checkpoint average, the mean of the exact ID scores after
  warm-ups of 1, 2, 3 and 4 epochs (the same seeded data order at a constant learning rate; warm-ups of 2 and 3
  epochs are run for it and reported as warmup_2, warmup_3);
- second_order: order 2 (the library's second-order term, exact target Hessian).
Baselines: random (5 draws: selection_seed 0-4), rds (RDS+, deterministic: 1 draw, training seeds 0-2), less
(the library's LESS, its defaults).
Draws: 3 per configuration and for LESS, d = 0, 1, 2, with selection_seed = warmup_seed = d; each draw trained
once with training seed d. Budget 104 rows (10% of the pool); training exactly as downstream v2 (a fresh
SmolLM2-135M-Instruct, LoRA r 8 on all linear layers, AdamW lr 5e-4 constant, batch 8, one epoch: 13 steps).

Scoring and statistics: downstream v2's (answer-token loss of the evaluation rows, change = after - before;
hierarchical bootstrap over draws then training runs, 10,000 resamples; differences by independent bootstraps),
reported per configuration and target: the mean change, its 95% interval, and the differences against random,
RDS+ and the current default (`exact`) with their intervals; each configuration's CPU seconds per selection.

Decision rule for the default representation, fixed now:
- A configuration c beats the current default when, on at least 2 of the 3 targets, its difference against
  `exact` has a 95% interval entirely below 0, and on no target entirely above 0.
- If several beat it, the new default is the one with the lowest mean loss change averaged over the three
  targets; if none does, the default stays as it is. If a derived configuration wins (token_sum, checkpoints_4),
  the library gains the option that computes it (a summed token loss; a checkpoint average) before it becomes
  the default.
- The issue's bar is reported for the chosen default, met or not: >= 2 sd better than random on every target,
  and within RDS+'s interval or better on >= 2 of 3.

Cost (estimated before the run, 2-core CPU): an exact gradient pass over 1,024 rows ~20 min, 10 passes per draw
(3 draws: ~10 h), ~150 training runs of ~2.5 min (~6 h): about 16 CPU hours over several sessions, resumable. A GPU
session can run the passes in minutes (the stores are device-independent files).

END OF PRE-REGISTRATION

Each configuration keeps its stores under CACHE/configs/<name>/work/draw-<d> (a LoRA, projection or warm-up change
is another store); the baselines share CACHE/work/draw-<d>. A derived configuration's selection reads the score
tables of the ones it is made of.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import downstream
import torch
from datasets import Dataset
from downstream import (BenchmarkData, Method, Settings, describe_selection, draw_rows, earlier_target_rows,
                        pool_prompts, preregistered_commit, select, target_file, without)
from selection_quality import DEFAULT_DATA_DIR

from hf_influence import ScoreTable
from hf_influence.data import load_rows
from hf_influence.extraction.store import atomic_write_json
from hf_influence.formatting import FormattingConfig, format_dataset
from hf_influence.selection.rules import select_indices

SCRIPT = Path(__file__).resolve()
EXACT = "influence_distillation_exact"
CODE_SOURCE = "codealpaca/"
# Target name -> (load_target task, options of the selection rows' file, of the evaluation rows' file); None: the
# pool file's Code Alpaca rows.
TARGETS = {"gsm8k": ("gsm8k", {}, {"held_out": True}), "mmlu": ("mmlu", {"held_out": True}, {"held_out": True}),
           "codealpaca": None}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "exact": Method(EXACT),
    "lora_mlp": Method(EXACT, {"lora_target_modules": ["gate_proj", "up_proj", "down_proj"]}),
    "lora_all": Method(EXACT, {"lora_target_modules": ALL_LINEAR}),
    "rank_32": Method(EXACT, {"lora_r": 32, "lora_alpha": 64}),
    "srht_32k": Method(EXACT, {"projection": "srht", "projection_dim": 32768}),
    "no_normalize": Method(EXACT, {"normalize": False}),
    "token_sum": Method(None),
    "sgd": Method(EXACT, {"optimizer_state": "warmup_gd"}),
    "warmup_2": Method(EXACT, {"warmup_epochs": 2.0}),
    "warmup_3": Method(EXACT, {"warmup_epochs": 3.0}),
    "warmup_4": Method(EXACT, {"warmup_epochs": 4.0}),
    "checkpoints_4": Method(None),
    "second_order": Method(EXACT, {"order": 2}),
}
# Derived configurations: what each reads.
DERIVED = {"token_sum": ("no_normalize",), "checkpoints_4": ("exact", "warmup_2", "warmup_3", "warmup_4")}
BASELINES = {"random": Method("random", draws=5), "rds": Method("rds", draws=1, train_seeds=3), "less": Method("less")}
METHODS = {**BASELINES, **CONFIGS}


def study_settings(**changes) -> Settings:
    """The pre-registered settings (downstream's Settings with this study's pool, seed, targets and rows)."""
    return replace(Settings(pool_rows=1024, seed=2027, targets=tuple(TARGETS), methods=tuple(METHODS),
                            method_table=dict(METHODS)), **changes)


def code_rows(rows: Dataset) -> Dataset:
    """Pool-format Code Alpaca rows as target rows: id, prompt (the user turn), completion (the assistant turn)."""
    turns = [{message["role"]: message["content"] for message in messages} for messages in rows["messages"]]
    return Dataset.from_dict({"id": rows["id"], "prompt": [t["user"] for t in turns],
                              "completion": [t["assistant"] for t in turns], "task": ["codealpaca"] * len(rows)})


def load_data(data_dir: Path, settings: Settings) -> BenchmarkData:
    """The study's pool and targets (module docstring), with downstream's overlap check extended to v2's rows."""
    v2 = downstream.load_data(data_dir, Settings())
    v2_ids = set(v2.pool["id"]) | {i for rows in v2.targets.values() for part in rows for i in part["id"]}
    v2_prompts = set(pool_prompts(v2.pool)) | {p for rows in v2.targets.values() for part in rows
                                               for p in part["prompt"]}
    order = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=0)
    used = order.select(range(settings.excluded_pool_prefix))
    used_ids, used_prompts = set(used["id"]) | set(v2.pool["id"]), set(pool_prompts(used)) | set(pool_prompts(v2.pool))
    rest = order.select(range(settings.excluded_pool_prefix, len(order)))
    rest = rest.select([i for i, (row_id, prompt) in enumerate(zip(rest["id"], pool_prompts(rest)))
                        if row_id not in used_ids and prompt not in used_prompts])
    pool = draw_rows(rest, settings.pool_rows, settings.seed)
    target_ids, target_prompts, checked = earlier_target_rows(data_dir, settings.excluded_target_prefix)
    target_ids, target_prompts = target_ids | v2_ids, target_prompts | v2_prompts
    checked.append(f"downstream v2: {len(v2.pool)} pool rows and its selection and evaluation rows")
    in_pool_ids, in_pool_prompts = set(pool["id"]), set(pool_prompts(pool))
    targets = {}
    for name in settings.targets:
        if TARGETS[name] is None:
            candidates = rest.select([i for i, source in enumerate(rest["source"]) if source.startswith(CODE_SOURCE)])
            selection_file = evaluation_file = without(code_rows(candidates), in_pool_ids, in_pool_prompts)
        else:
            task, selection_options, evaluation_options = TARGETS[name]
            selection_file = target_file(data_dir, task, **selection_options)
            evaluation_file = target_file(data_dir, task, **evaluation_options)
        selection = draw_rows(without(selection_file, target_ids, target_prompts), settings.selection_rows,
                              settings.seed + 1)
        candidates = without(without(evaluation_file, target_ids, target_prompts), set(selection["id"]),
                             set(selection["prompt"]))
        targets[name] = selection, draw_rows(candidates, settings.eval_rows, settings.seed + 2)
    data = BenchmarkData(pool, targets)
    data.overlap_check = downstream.overlap_check(data, used_ids, used_prompts, target_ids, target_prompts, checked)
    return data


def response_tokens(data: BenchmarkData, settings: Settings, tokenizer) -> torch.Tensor:
    """[n] response-token count of each pool row as the library formats it (what the loss is averaged over)."""
    formatted = format_dataset(data.pool, tokenizer, FormattingConfig(max_length=settings.max_length),
                               show_progress=False).dataset
    return torch.tensor([sum(label != -100 for label in labels) for labels in formatted["labels"]], dtype=torch.float64)


def derived_selection(data: BenchmarkData, target: str, method: str, draw: int, settings: Settings, cache: Path,
                      tokenizer_loader) -> dict:
    """token_sum / checkpoints_4 (module docstring) from the score tables of the draw's configurations, selected
    by exact ID's rule."""
    tables = [ScoreTable.load(config_root(cache, name) / "tables" / target / f"{name}-{draw}")
              for name in DERIVED[method]]
    matrices = [table.to_matrix() for table in tables]
    row_ids = matrices[0][1]
    if any(ids != row_ids for _, ids, _ in matrices):
        raise RuntimeError(f"{method}: its score tables do not hold the same pool rows")
    if method == "token_sum":
        counts = response_tokens(data, settings, tokenizer_loader())[row_ids]
        scores = matrices[0][0].double() * counts[:, None]
    else:
        scores = torch.stack([matrix.double() for matrix, _, _ in matrices]).mean(0)
    rule = tables[0].provenance["selection"]
    chosen = select_indices(scores, settings.budget, rule=rule, seed=draw)
    selected = [row_ids[i] for i in chosen.tolist()]
    return {"selected_pool_row_ids": selected, "selection_seconds": 0.0, "derived_from": list(DERIVED[method]),
            "rule": rule, **describe_selection(data.pool, selected)}


def config_root(cache: Path, method: str) -> Path:
    """Where a configuration's stores and tables live (the baselines share the cache root)."""
    return cache if method in BASELINES else cache / "configs" / method


def selector(data, target, method, draw, settings, cache, model_loader, log) -> dict:
    """downstream.run_benchmark's selector: derived configurations from their parts, the others through the
    registry in their own folder."""
    if method in DERIVED:
        return derived_selection(data, target, method, draw, settings, cache, lambda: model_loader()[1])
    return select(data, target, method, draw, settings, config_root(cache, method), model_loader)


def decide(targets: dict) -> dict:
    """The pre-registered decision rule (module docstring) on the summarised targets."""
    if len(targets) < len(TARGETS):
        return {"decided": False, "reason": f"{len(targets)} of {len(TARGETS)} targets reported"}
    winners = {}
    for name in CONFIGS:
        intervals = [report["methods"].get(name, {}).get("vs_exact_ci95") for report in targets.values()]
        if name == "exact" or any(ci is None for ci in intervals):
            continue
        if sum(ci[1] < 0 for ci in intervals) >= 2 and not any(ci[0] > 0 for ci in intervals):
            winners[name] = sum(report["methods"][name]["loss_change_mean"] for report in targets.values()) / len(
                targets)
    chosen = min(winners, key=winners.get) if winners else "exact"
    bar = {}
    for target, report in targets.items():
        row = report["methods"].get(chosen, {})
        effect, rds = row.get("effect_size_vs_random"), row.get("vs_rds_ci95")
        bar[target] = {"2sd_better_than_random": None if effect is None else -effect >= 2,
                       "within_or_better_than_rds": None if rds is None else rds[0] <= 0}
    return {"decided": True, "beats_default": winners, "chosen": chosen, "bar": bar,
            "bar_met": all(b["2sd_better_than_random"] for b in bar.values())
            and sum(bool(b["within_or_better_than_rds"]) for b in bar.values()) >= 2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="stores, score tables and finished runs")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--runs", type=Path, help="the runs log (default CACHE/runs.json; the study of record keeps "
                                                  "benchmarks/results/signal_runs.json, committed as it grows)")
    parser.add_argument("--plot", type=Path, help="PNG with one panel per target")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), help="run (and report) only these targets")
    parser.add_argument("--configs", nargs="+", choices=list(METHODS),
                        help="run only these rows (the parts of a derived one are added)")
    parser.add_argument("--report-only", action="store_true", help="write the JSON / plot from finished runs")
    parser.add_argument("--allow-uncommitted", action="store_true",
                        help="start a cache although this script differs from its last commit (development only)")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found")
        return 0
    methods = tuple(METHODS) if not args.configs else tuple(dict.fromkeys(
        part for name in args.configs for part in (*DERIVED.get(name, ()), name)))
    settings = study_settings(methods=methods, **({"targets": tuple(args.targets)} if args.targets else {}))
    started = time.perf_counter()
    data, log = downstream.run_registered(args, settings, preregistered_commit(SCRIPT, __doc__), load_data, selector,
                                          SCRIPT)
    result = downstream.report(data, log, settings, started)
    result.pop("headline")  # downstream's claim about its "default" row; this study's rule is `decision`
    result["decision"] = decide(result["targets"])
    print(downstream.markdown_table(result["targets"]))
    print(json.dumps(result["decision"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, result)
    if args.plot and result["targets"]:
        downstream.plot(result["targets"], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
