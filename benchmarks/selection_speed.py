"""The library's default selection path vs exact Influence Distillation: wall time and agreement, per budget.

    python benchmarks/selection_speed.py --json benchmarks/results/selection_speed_cpu.json \
        [--pool-rows 4096 --budgets 0.05,0.10]

Exact ID (an Adam-preconditioned LoRA gradient of every pool row) runs once; the default path (JVP embeddings of
every row, landmarks and a shortlist scored exactly, bounded together by exact_gradient_fraction) runs once per
budget, each through `select_by_influence` with the library's defaults (only --landmarks, when given, and the
budget are set) in a fresh work dir, so nothing is reused between runs. Same model (SmolLM2-135M-Instruct by
default), pool (a seeded slice of ../shared/data/pool.jsonl.gz) and target (a seeded sample of GSM8K test
problems). Exact ID's selection at each budget is its rule applied to its score table.

Per budget: `speedup_vs_exact` = exact seconds / default seconds (warm-up and target gradients included in both:
a fixed cost that caps the speed-up on small pools), `pool_side_speedup_vs_exact` (warm-up and targets left
out), `selection_jaccard` of the two selections, `spearman` of the per-row mean scores, `exact_gradient_rows`
the default run took, and its own report (`exact_gradients`: predicted and measured speed-up). Goals: speed-up
>= 3 at 5% and >= 2.5 at 10%, Jaccard >= 0.6. CPU timings are wall clock on a possibly shared two-core machine:
the 1-minute load average is sampled during each run and reported beside its seconds.

Resumable: with --cache DIR each finished run (its record and ScoreTable) is kept in DIR and a rerun with the same
settings does only the runs that are missing (a 4,096-row run takes about two and a half hours on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Offline before any Hugging Face import: the Hub is unreachable here and the data are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from datasets.utils.logging import disable_progress_bar
from scipy.stats import spearmanr

# The sibling benchmark holds the data slicing and machine record both benchmarks share
# (this folder is on sys.path when a script in it is run).
from selection_quality import (
    DEFAULT_DATA_DIR,
    LoadSampler,
    load_data,
    machine,
    mean_scores,
    peak_memory_gb,
)
from transformers.utils import logging as hf_logging

from hf_influence import DEFAULT_MODEL, ScoreTable, load_model, select_by_influence
from hf_influence.selection.rules import select_indices
from hf_influence.extraction.store import atomic_write_json

POOL_STAGES = ("jvp_embeddings", "lm_embeddings", "landmark_gradients", "shortlist_gradients", "pool_gradients")


def run(method: str, budget: float, pool, target, model, tokenizer, args, work_dir: Path) -> dict:
    print(f"{method} at budget {budget} ...", flush=True)
    options = {} if args.landmarks is None else {"num_landmarks": args.landmarks}
    with LoadSampler() as load:
        start = time.perf_counter()
        _, table = select_by_influence(
            pool, target, model=model, tokenizer=tokenizer, budget=budget, method=method, return_scores=True,
            response_column="solution", max_length=args.max_length, selection_seed=args.seed, work_dir=str(work_dir),
            show_progress=False, warmup_show_progress=False, **options,
        )
        seconds = time.perf_counter() - start
    print(f"{method}: {seconds:.1f} s", flush=True)
    stages = table.provenance["details"]["seconds"]
    return {"seconds": seconds, "pool_side_seconds": sum(stages.get(stage, 0.0) for stage in POOL_STAGES),
            "stage_seconds": stages, "load_average": load.record, "table": table,
            "exact_gradients": table.provenance["details"].get("exact_gradients")}


def cached_run(name: str, method: str, budget: float, pool, target, model, tokenizer, args) -> dict:
    """run() in a fresh work dir, or its kept record and table from --cache (written after the run finished)."""
    keep = None if args.cache is None else args.cache / name
    if keep is not None and (keep / "record.json").exists():
        record = json.loads((keep / "record.json").read_text())
        if record.pop("settings") == settings(args):
            print(f"{name}: kept from {keep}", flush=True)
            return {**record, "table": ScoreTable.load(keep / "table")}
    with tempfile.TemporaryDirectory(prefix=f"selection_speed_{name}_") as work_dir:
        result = run(method, budget, pool, target, model, tokenizer, args, Path(work_dir))
    if keep is not None:
        result["table"].save(keep / "table")
        record = {key: value for key, value in result.items() if key != "table"}
        atomic_write_json(keep / "record.json", {**record, "settings": settings(args)})
    return result


def settings(args) -> dict:
    """What a kept run depends on: a rerun with other settings recomputes it."""
    return {"model": args.model, "pool_rows": args.pool_rows, "landmarks": args.landmarks,
            "target_rows": args.target_rows, "max_length": args.max_length, "seed": args.seed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="Where to write the results.")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="The shared data folder.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or folder of the causal LM.")
    parser.add_argument("--pool-rows", type=int, default=4096)
    parser.add_argument("--landmarks", type=int, default=None, help="num_landmarks (default: the library's).")
    parser.add_argument("--target-rows", type=int, default=32)
    parser.add_argument("--budgets", default="0.05,0.10", help="Pool shares selected, each a default run.")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data slices and the landmarks.")
    parser.add_argument("--cache", type=Path, default=None, help="Keep each finished run here; a rerun resumes.")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found (pass --data-dir)")
        return 0
    hf_logging.disable_progress_bar()
    disable_progress_bar()

    pool, target = load_data(args.data_dir, args.pool_rows, args.target_rows, args.seed)
    model, tokenizer = load_model(args.model)
    budgets = [float(b) for b in args.budgets.split(",")]
    exact = cached_run("exact", "influence_distillation_exact", budgets[0], pool, target, model, tokenizer, args)
    exact_table = exact.pop("table")
    exact_scores, exact_rows, _ = exact_table.to_matrix()
    rule = exact_table.provenance["configs"]["SelectionConfig"].get("selection") or "round_robin"
    results = []
    for budget in budgets:
        default = cached_run(f"default_{budget}", "influence_distillation", budget, pool, target, model, tokenizer,
                             args)
        table = default.pop("table")
        chosen = set(table.provenance["selected_pool_row_ids"])
        budget_rows = len(chosen)
        reference = {exact_rows[i] for i in select_indices(exact_scores, budget_rows, rule=rule, seed=args.seed).tolist()}
        scores_default, scores_exact = mean_scores(table), mean_scores(exact_table)
        rows = sorted(scores_default.keys() & scores_exact.keys())
        results.append({
            "budget": budget, "pool_rows": len(pool), "selected_rows": budget_rows,
            "speedup_vs_exact": exact["seconds"] / default["seconds"],
            "pool_side_speedup_vs_exact": exact["pool_side_seconds"] / default["pool_side_seconds"],
            "selection_jaccard": len(chosen & reference) / len(chosen | reference),
            "spearman": float(spearmanr([scores_default[r] for r in rows], [scores_exact[r] for r in rows]).statistic),
            "exact_gradient_rows": (default["exact_gradients"] or {}).get("exact_gradient_rows"),
            "default": default,
        })
    summary = {
        "config": {"model": args.model, "pool_rows": len(pool), "landmarks": args.landmarks or "library default",
                   "target_rows": len(target), "target": "gsm8k_test", "budgets": budgets, "rule": rule,
                   "max_length": args.max_length, "seed": args.seed},
        "machine": {**machine(), "peak_memory_gb": peak_memory_gb()},
        "influence_distillation_exact": exact,
        "budgets": results,
    }
    print(f"\ndefault path vs exact ID: pool {len(pool)} rows, GSM8K target {len(target)} rows, max_length "
          f"{args.max_length}; {summary['machine']['processor']}; exact ID {exact['seconds']:.0f} s "
          f"(pool side {exact['pool_side_seconds']:.0f} s)")
    print("| budget | default s | pool side s | speed-up (pool side) | selection Jaccard | Spearman | exact gradients |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['budget']:.0%} | {r['default']['seconds']:.0f} | {r['default']['pool_side_seconds']:.0f} | "
              f"{r['speedup_vs_exact']:.2f}x ({r['pool_side_speedup_vs_exact']:.2f}x) | {r['selection_jaccard']:.3f} | "
              f"{r['spearman']:.3f} | {r['exact_gradient_rows']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
