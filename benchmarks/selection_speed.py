"""Influence Distillation with landmarks vs exact Influence Distillation: wall time and agreement.

    python benchmarks/selection_speed.py --json benchmarks/results/selection_speed_cpu.json [--pool-rows 1024 --landmarks 32]

Both methods select the same budget from the same pool (a seeded random slice of ../shared/data/pool.jsonl.gz)
for the same target (a seeded sample of GSM8K test problems) with the same real model (SmolLM2-135M-Instruct
by default), each in its own fresh work dir, so nothing is reused between them. Exact ID takes an
Adam-preconditioned LoRA gradient of every pool row; ID with landmarks takes gradients of only k landmark
rows plus a cheap JVP embedding of every row, and spreads the landmark scores to the rest by kernel
regression. The pool:landmark ratio is at least 16:1, the regime the method is meant for.

Reported: the wall seconds of each `select_by_influence` call (model loading excluded: it is loaded once) and
`speedup_vs_exact` = exact seconds / landmark seconds; `topk_jaccard`, the Jaccard index of the two selected
row sets; `spearman`, the rank correlation of the two per-pool-row mean scores (over the targets); and the
per-stage seconds from each score table's provenance. Targets: speedup >= 4x at 16:1, Jaccard >= 0.6.

Both runs include the same seeded warm-up and target gradients, a fixed cost that caps the speedup at small
pools. CPU timings are wall clock on a possibly shared two-core machine, so the 1-minute load average is
sampled during each run and reported beside its seconds.
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

from hf_influence import DEFAULT_MODEL, load_model, select_by_influence

METHODS = ("influence_distillation", "influence_distillation_exact")
MIN_POOL_PER_LANDMARK = 16


def run(method: str, pool, target, model, tokenizer, args, work_dir: Path) -> dict:
    print(f"{method} ...", flush=True)
    with LoadSampler() as load:
        start = time.perf_counter()
        _, table = select_by_influence(
            pool, target, model=model, tokenizer=tokenizer, budget=args.budget, method=method, return_scores=True,
            response_column="solution", max_length=args.max_length, num_landmarks=args.landmarks,
            selection_seed=args.seed, work_dir=str(work_dir), show_progress=False, warmup_show_progress=False,
        )
        seconds = time.perf_counter() - start
    print(f"{method}: {seconds:.1f} s", flush=True)
    return {"seconds": seconds, "stage_seconds": table.provenance["details"]["seconds"], "load_average": load.record,
            "selected": table.provenance["selected_pool_row_ids"], "mean_scores": mean_scores(table)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="Where to write the results.")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="The shared data folder.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or folder of the causal LM.")
    parser.add_argument("--pool-rows", type=int, default=1024)
    parser.add_argument("--landmarks", type=int, default=32)
    parser.add_argument("--target-rows", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.05, help="Fraction of the pool in (0, 1].")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data slices and the landmarks.")
    args = parser.parse_args()
    if args.pool_rows < MIN_POOL_PER_LANDMARK * args.landmarks:
        parser.error(f"--pool-rows must be at least {MIN_POOL_PER_LANDMARK}x --landmarks (the regime being measured).")
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found (pass --data-dir)")
        return 0
    hf_logging.disable_progress_bar()
    disable_progress_bar()

    pool, target = load_data(args.data_dir, args.pool_rows, args.target_rows, args.seed)
    model, tokenizer = load_model(args.model)
    runs = {}
    for method in METHODS:
        with tempfile.TemporaryDirectory(prefix=f"selection_speed_{method}_") as work_dir:
            runs[method] = run(method, pool, target, model, tokenizer, args, Path(work_dir))

    landmark, exact = runs["influence_distillation"], runs["influence_distillation_exact"]
    chosen_landmark, chosen_exact = set(landmark.pop("selected")), set(exact.pop("selected"))
    scores_landmark, scores_exact = landmark.pop("mean_scores"), exact.pop("mean_scores")
    rows = sorted(scores_landmark.keys() & scores_exact.keys())
    summary = {
        "config": {"model": args.model, "pool_rows": len(pool), "landmarks": args.landmarks,
                   "target_rows": len(target), "target": "gsm8k_test", "budget": args.budget,
                   "selected_rows": len(chosen_exact), "max_length": args.max_length, "seed": args.seed},
        "machine": {**machine(), "peak_memory_gb": peak_memory_gb()},
        "influence_distillation": landmark,
        "influence_distillation_exact": exact,
        "speedup_vs_exact": exact["seconds"] / landmark["seconds"],
        "topk_jaccard": len(chosen_landmark & chosen_exact) / len(chosen_landmark | chosen_exact),
        "spearman": float(spearmanr([scores_landmark[r] for r in rows], [scores_exact[r] for r in rows]).statistic),
    }

    print(f"\nID with {args.landmarks} landmarks vs exact ID: pool {len(pool)} rows, GSM8K target {len(target)} rows, "
          f"budget {args.budget} ({len(chosen_exact)} rows), max_length {args.max_length}; {summary['machine']['processor']}")
    stages = list(dict.fromkeys(stage for r in (landmark, exact) for stage in r["stage_seconds"] if stage != "total"))
    print(f"{'method':>28} | {'seconds':>8} | {'load':>4} | " + " | ".join(f"{s:>18}" for s in stages))
    for method, result in (("influence_distillation", landmark), ("influence_distillation_exact", exact)):
        cells = [f"{result['stage_seconds'][s]:>18.1f}" if s in result["stage_seconds"] else f"{'-':>18}" for s in stages]
        print(f"{method:>28} | {result['seconds']:>8.1f} | {result['load_average']['mean']:>4.1f} | " + " | ".join(cells))
    print(f"speedup_vs_exact {summary['speedup_vs_exact']:.2f}x (target >= 4x at 16:1), topk_jaccard {summary['topk_jaccard']:.3f} "
          f"(target >= 0.6), spearman {summary['spearman']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
