"""Selection quality on a real pool: how many GSM8K-like rows each method picks for a GSM8K target.

    python benchmarks/selection_quality.py --json benchmarks/results/selection_quality_cpu.json [--pool-rows 1024]

The target is a seeded sample of GSM8K test problems (prompt + worked solution); the pool is a seeded random
slice of the shared Tulu-style pool (../shared/data/pool.jsonl.gz). The pool holds GSM8K *train* problems
(`flan_cot/gsm8k`) and AQuA maths word problems (`flan_cot/aqua`) among many unrelated tasks, so the share of
those rows in a selection (`in_domain_share`) is a cheap, label-free check of precision: a method that
understands the target should beat the pool's base rate (`pool_in_domain_share`), which is what `random`
gets in expectation.

For every method (Influence Distillation with landmarks, exact Influence Distillation, LESS, RDS+, random)
the script selects the budget from the same pool for the same target with the same model and records the
in-domain share and the wall seconds of `select_by_influence` (model loading excluded: it is loaded once).
Landmark fidelity is part of the story, so it also reports the Spearman correlation between the per-pool-row
mean scores of ID with landmarks and of exact ID.

Cost sharing: exact ID and LESS take the same Adam-preconditioned LoRA gradients of every pool row after the
same seeded warm-up, and the gradient stores are keyed by model, data fingerprint and config. Exact ID runs
first with a fresh store and pays for the gradients; LESS then runs in the same work dir and reuses them
(it still redoes its own warm-up). LESS's `seconds` is that measured wall time, flagged `reused_gradients`;
`seconds_standalone` adds exact ID's gradient stages to it, which is what LESS would cost on its own.

CPU timings are wall clock on a possibly shared machine: with two cores, one other busy process can slow a
stage several times over, so the 1-minute load average is sampled while each method runs and reported
beside its seconds (this run alone accounts for about its torch thread count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

# Offline before any Hugging Face import: the Hub is unreachable here and the data are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from datasets.utils.logging import disable_progress_bar
from machine_info import cpu_model
from scipy.stats import spearmanr
from transformers.utils import logging as hf_logging

from hf_influence import DEFAULT_MODEL, load_model, select_by_influence
from hf_influence.data import load_rows

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_DOMAIN_SOURCES = ("flan_cot/gsm8k", "flan_cot/aqua")
# Exact ID before LESS, so that LESS is the one reusing the gradient store (see the module docstring).
METHODS = ("influence_distillation", "influence_distillation_exact", "less", "rds", "random")
SHARED_STORE_METHODS = ("influence_distillation_exact", "less")


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": cpu_model(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_memory_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


class LoadSampler:
    """Samples the 1-minute load average every `interval` seconds while in use; `.record` gives mean and max.

    This run's own torch threads count too: a load near `torch.get_num_threads()` means nothing else ran.
    """

    def __init__(self, interval: float = 15.0):
        self.interval, self.samples, self._stop = interval, [], threading.Event()

    def __enter__(self):
        def sample():
            while True:
                self.samples.append(os.getloadavg()[0])
                if self._stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    @property
    def record(self) -> dict:
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples)}


def load_data(data_dir: Path, pool_rows: int, target_rows: int, seed: int):
    """Seeded random slices of the shared pool and of the GSM8K test set."""
    pool = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=seed)
    target = load_rows(data_dir / "targets" / "gsm8k_test.jsonl.gz").shuffle(seed=seed)
    return pool.select(range(min(pool_rows, len(pool)))), target.select(range(min(target_rows, len(target))))


def in_domain_share(sources: list[str]) -> float:
    return sum(source.startswith(IN_DOMAIN_SOURCES) for source in sources) / len(sources)


def mean_scores(table) -> dict[int, float]:
    """{pool row id: mean score over the targets}; row ids, not positions, so two tables always align."""
    scores, row_ids, _ = table.to_matrix()
    return dict(zip(row_ids, scores.double().mean(1).tolist()))


def run_methods(pool, target, model, tokenizer, budget, args, work_dir: Path) -> tuple[dict, dict]:
    results, tables = {}, {}
    for method in args.methods.split(","):
        folder = work_dir / ("shared_gradients" if method in SHARED_STORE_METHODS else method)
        print(f"{method} ...", flush=True)
        with LoadSampler() as load:
            start = time.perf_counter()
            selected, table = select_by_influence(
                pool, target, model=model, tokenizer=tokenizer, budget=budget, method=method, return_scores=True,
                response_column="solution", max_length=args.max_length, num_landmarks=args.num_landmarks,
                selection_seed=args.seed, work_dir=str(folder), show_progress=False, warmup_show_progress=False,
            )
            seconds = time.perf_counter() - start
        print(f"{method}: {seconds:.1f} s", flush=True)
        results[method] = {"in_domain_share": in_domain_share(selected["source"]), "seconds": seconds,
                           "selected": len(selected), "selection_rule": table.provenance["selection"],
                           "stage_seconds": table.provenance["details"].get("seconds", {}),
                           "load_average": load.record}
        tables[method] = table
    return results, tables


def add_less_standalone_cost(results: dict) -> None:
    """LESS reused exact ID's gradient stores: flag it and add back what computing them cost exact ID."""
    if "less" not in results or "influence_distillation_exact" not in results:
        return
    exact_stages = results["influence_distillation_exact"]["stage_seconds"]
    reused = {stage: exact_stages.get(stage, 0.0) for stage in ("pool_gradients", "target_gradients")}
    results["less"]["reused_gradients"] = "pool and target gradient stores of influence_distillation_exact"
    results["less"]["seconds_standalone"] = results["less"]["seconds"] + sum(reused.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="Where to write the results.")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="The shared data folder.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or folder of the causal LM.")
    # About 1k pool rows keeps the whole run near 40 minutes on 2 CPU cores (exact ID's per-row gradients
    # dominate); raise it on a GPU.
    parser.add_argument("--pool-rows", type=int, default=1024)
    parser.add_argument("--target-rows", type=int, default=32)
    parser.add_argument("--budget", type=float, default=0.05, help="Fraction of the pool in (0, 1], or a row count above 1.")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-landmarks", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data slices, landmarks and random baseline.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated, run in this order.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Keep the stores here (re-running resumes and reuses them); default: a temporary folder.")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found (pass --data-dir)")
        return 0
    hf_logging.disable_progress_bar()
    disable_progress_bar()
    budget = int(args.budget) if args.budget > 1 else args.budget

    pool, target = load_data(args.data_dir, args.pool_rows, args.target_rows, args.seed)
    model, tokenizer = load_model(args.model)  # once for every method
    with tempfile.TemporaryDirectory(prefix="selection_quality_") as scratch:
        results, tables = run_methods(pool, target, model, tokenizer, budget, args, args.work_dir or Path(scratch))
    add_less_standalone_cost(results)

    summary = {
        "config": {"model": args.model, "pool_rows": len(pool), "target_rows": len(target), "target": "gsm8k_test",
                   "budget": budget, "max_length": args.max_length, "num_landmarks": args.num_landmarks,
                   "seed": args.seed, "in_domain_sources": list(IN_DOMAIN_SOURCES)},
        "machine": {**machine(), "peak_memory_gb": peak_memory_gb()},
        "pool_in_domain_share": in_domain_share(pool["source"]),
        **results,
    }
    if "influence_distillation" in tables and "influence_distillation_exact" in tables:
        landmark, exact = mean_scores(tables["influence_distillation"]), mean_scores(tables["influence_distillation_exact"])
        rows = sorted(landmark.keys() & exact.keys())
        summary["influence_distillation"]["spearman_vs_exact"] = float(
            spearmanr([landmark[r] for r in rows], [exact[r] for r in rows]).statistic)

    print(f"\nGSM8K target ({len(target)} rows), pool of {len(pool)} rows, budget {budget}, "
          f"max_length {args.max_length}, {args.num_landmarks} landmarks; {summary['machine']['processor']}")
    print(f"pool base rate of {' / '.join(IN_DOMAIN_SOURCES)}: {summary['pool_in_domain_share']:.3f}")
    print(f"{'method':>30} | {'in-domain':>9} | {'x base':>6} | {'seconds':>8} | {'load':>4} | note")
    for method, result in results.items():
        lift = result["in_domain_share"] / summary["pool_in_domain_share"] if summary["pool_in_domain_share"] else float("nan")
        note = ""
        if "spearman_vs_exact" in result:
            note = f"Spearman vs exact {result['spearman_vs_exact']:.3f}"
        if "seconds_standalone" in result:
            note = f"gradients reused from exact ID; {result['seconds_standalone']:.0f} s standalone"
        print(f"{method:>30} | {result['in_domain_share']:>9.3f} | {lift:>5.2f}x | {result['seconds']:>8.1f} | {result['load_average']['mean']:>4.1f} | {note}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
