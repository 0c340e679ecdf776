"""Simulated-scale streaming selection : seconds and peak anonymous memory per pool size, model passes excluded.

--path default (the default) measures the library's default selection path: landmarks and shortlist from
exact_gradient_plan (at most exact_gradient_fraction x n exact gradients), one streaming pass that keeps each
target's best budget + landmarks + shortlist rows and shortlists from them, the shortlisted rows' first-order scores
read from their gradient store (--gradient-dim, float32, streamed), and the final selection from the kept rows with
the landmarks and the shortlist scored exactly (a second streaming pass instead when the kept rows would exceed
ONE_PASS_MAX_CANDIDATES, as in the library; `passes` says which). The shortlist's gradient store is written before its reads
are timed, as the model pass writes it in the library (that pass is excluded like every model pass, and the
memory of the synthetic writer is not counted). --path regression measures the regression alone (the paper's
algorithm, and what this benchmark measured before the shortlist existed).

    python benchmarks/scale.py --json benchmarks/results/scale_cpu.json [--sizes 100000,1000000,10000000]
                               [--max-seconds 2400] [--data-dir /tmp/hf_influence_scale]

For each pool size n: synthetic JVP-like embeddings [n, --dim] (fp16) and scores of --landmarks landmark rows for
--targets target samples stand in for the model passes; the measured selection then does what
influence_distillation does after them: fit the kernel ridge regression on the landmarks (rbf kernel, median
bandwidth, float64 solve) and stream_select a --budget fraction of the pool by round-robin over the targets
(float32 rbf kernel per block, landmarks keep their exact scores), reading the pool chunk by chunk.

Embeddings: row i = centre[c(i)] + 0.5 (a[i mod 4096] + b[(i div 4096) mod 4096]) from three seeded [4096, dim]
banks, so every row is distinct (up to 16.7M rows), the pool is clustered, and any row can be made on its own
(landmarks) or in blocks, identically. Two data modes:
  stored      written chunk-wise into a memory-mapped fp16 VectorStore (n x dim x 2 bytes on disk) before the
              measurement, then evicted from the page cache (posix_fadvise DONTNEED), so the selection reads it
              from disk through the memory maps (page-cache pages are not RssAnon); deleted unless --keep-data
  on_the_fly  regenerated block by block during the selection, for pools whose store would not fit on the disk
              (10M x 4096 fp16 = 80 GB); the generation time is measured and subtracted, the banks (48 MB fp16)
              count in the memory
Each size is measured in a fresh subprocess: `seconds` is the fit plus the streaming selection (not the data
generation, not the landmark reads), `peak_rss_anon_mb` the largest RssAnon of /proc/self/status sampled every
5 ms by a thread (the Python + torch baseline included; also reported alone). `time_exponent` is the least-squares
slope of log(seconds) over log(rows). Sizes whose time, extrapolated from the previous size (fit constant, stream
linear), exceeds --max-seconds are skipped (and listed). Stored and on-the-fly pools hold the same rows, so a size
gives the same `selected_sha256` either way. Targets : 1M rows in <= 600 s with <= 4096 MB RssAnon on the
2-core CPU, time exponent <= 1.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from machine_info import cpu_model

from hf_influence.selection.landmarks import LandmarkRegressor, select_landmarks
from hf_influence.methods.influence_distillation import ONE_PASS_MAX_CANDIDATES, ExactGradientPlan, exact_gradient_plan
from hf_influence.methods.stores import store_scores
from hf_influence.methods.influence_distillation_config import InfluenceDistillationConfig
from hf_influence.selection.rules import key_columns
from hf_influence.extraction.store import StoreSpec, VectorStore, atomic_write_json
from hf_influence.selection.streaming import ScoreStream, predict_scores, stream_select

BANK_ROWS = 4096  # rows of each noise bank: BANK_ROWS**2 distinct rows
CLUSTERS = 64
WRITE_ROWS = 16384  # rows generated and written per store write (128 MB fp16 at dim 4096)


class SyntheticPool:
    """Deterministic synthetic embeddings [n, dim] (fp16), readable by row slices like an array."""

    def __init__(self, rows: int, dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.shape = (rows, dim)
        self.centres = (2.0 * torch.randn(CLUSTERS, dim, generator=generator)).half()
        self.bank_a = (0.5 * torch.randn(BANK_ROWS, dim, generator=generator)).half()
        self.bank_b = (0.5 * torch.randn(BANK_ROWS, dim, generator=generator)).half()
        self.generation_seconds = 0.0

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Embeddings of the given row indices [r] -> [r, dim] fp16."""
        start = time.perf_counter()
        cluster = (index * 2654435761) % CLUSTERS  # Knuth's multiplicative hash: clusters interleave
        out = self.centres[cluster].float()
        out += self.bank_a[index % BANK_ROWS].float()
        out += self.bank_b[(index // BANK_ROWS) % BANK_ROWS].float()
        out = out.half()
        self.generation_seconds += time.perf_counter() - start
        return out

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self.rows(torch.arange(start, stop))


def landmark_scores(embeddings: torch.Tensor, targets: int, seed: int) -> torch.Tensor:
    """Synthetic landmark influences [k, m]: a smooth function of the embeddings plus noise."""
    generator = torch.Generator().manual_seed(seed + 1)
    weights = torch.randn(embeddings.shape[1], targets, generator=generator) / embeddings.shape[1] ** 0.5
    return torch.tanh(embeddings.float() @ weights) + 0.1 * torch.randn(len(embeddings), targets, generator=generator)


def write_store(path: Path, pool: SyntheticPool, seed: int) -> float:
    """The pool as a memory-mapped fp16 VectorStore, written (or resumed) chunk-wise. Returns the seconds taken."""
    rows, dim = pool.shape
    spec = StoreSpec(kind="synthetic_jvp_embeddings", model_id="synthetic", model_revision=None,
                     dataset_fingerprint=f"synthetic-{rows}", config={"seed": seed, "dim": dim, "bank_rows": BANK_ROWS,
                                                                      "clusters": CLUSTERS},
                     num_rows=rows, dim=dim, dtype="float16")
    start = time.perf_counter()
    store = VectorStore.create_or_open(path, spec)
    for lo, hi in store.pending_batches(WRITE_ROWS):
        store.write(lo, pool[lo:hi])
    store.update_manifest(written_seconds=time.perf_counter() - start)
    return time.perf_counter() - start


def evict_from_page_cache(path: Path) -> None:
    """Drop the store's (flushed, clean) pages from the page cache, so that the selection reads it from disk."""
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class RssAnonSampler:
    """Peak RssAnon of this process (MB), sampled every `interval` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, self.read(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        return self.peak


def write_gradients(path: Path, rows: torch.Tensor, dim: int, seed: int) -> None:
    """Synthetic unit-norm gradients [len(rows), dim] float32 of the given pool rows, as a VectorStore (the store
    the library's shortlist pass writes), evicted from the page cache."""
    generator = SyntheticPool(int(rows.max()) + 1, dim, seed + 7)
    spec = StoreSpec(kind="synthetic_gradients", model_id="synthetic", model_revision=None,
                     dataset_fingerprint=f"synthetic-shortlist-{len(rows)}", config={"seed": seed, "dim": dim},
                     num_rows=len(rows), dim=dim)
    store = VectorStore.create_or_open(path, spec)
    for lo, hi in store.pending_batches(WRITE_ROWS // 4):
        store.write(lo, torch.nn.functional.normalize(generator.rows(rows[lo:hi]).float(), dim=1))
    evict_from_page_cache(path)


def measure(args: argparse.Namespace, rows: int, mode: str, store_path: str | None) -> dict:
    """One pool size, in this (fresh) process: fit + stream_select (+ the shortlist on the default path), timed,
    with RssAnon sampled."""
    sampler = RssAnonSampler()
    baseline = sampler.read()
    budget = max(1, round(args.budget * rows))
    if args.path == "default":
        plan = exact_gradient_plan(InfluenceDistillationConfig(num_landmarks=args.landmarks,
                                                               exact_gradient_fraction=args.exact_fraction), rows,
                                   budget)
    else:
        plan = ExactGradientPlan(min(args.landmarks, rows), 0, None)
    landmarks = select_landmarks(rows, plan.landmarks, seed=args.seed)
    if mode == "stored":  # read back from the store, as the selection will read the pool
        source = VectorStore.open(store_path)
        landmark_embeddings = torch.from_numpy(np.stack([source.read(i, i + 1)[0] for i in landmarks.tolist()]))
    else:
        source = SyntheticPool(rows, args.dim, args.seed)
        landmark_embeddings = source.rows(landmarks)
        source.generation_seconds = 0.0
    scores = landmark_scores(landmark_embeddings, args.targets, args.seed)

    start = time.perf_counter()
    regressor = LandmarkRegressor().fit(landmark_embeddings.float(), scores, kernel="rbf", seed=args.seed)
    fit_seconds = time.perf_counter() - start
    # The default path ranks landmarks by their leave-one-out predictions (landmark_scores="loo"); the regression
    # path keeps their exact scores, as this benchmark always measured it.
    known = regressor.loo.float() if args.path == "default" else scores
    excluded, shortlist_seconds, new_rows, retained = 0.0, 0.0, 0, None
    stream = {"chunk_rows": args.chunk_rows, "block_rows": args.block_rows}
    if plan.shortlist:
        keep = min(rows, budget + plan.landmarks + plan.shortlist)
        if key_columns("round_robin", args.targets) * keep <= ONE_PASS_MAX_CANDIDATES:
            retained = ScoreStream(source, regressor, {"exact_rows": landmarks, "exact_scores": known},
                                   **stream).candidates(keep, "round_robin")
            shortlist = retained.select(plan.shortlist, seed=args.seed)
        else:
            shortlist = stream_select(source, regressor, plan.shortlist, "round_robin", seed=args.seed,
                                      exact_rows=landmarks, exact_scores=known, **stream)
        new = shortlist[~torch.isin(shortlist, landmarks)].sort().values
        new_rows = len(new)
        paused = time.perf_counter()
        before_write = sampler.peak
        gradients_path = Path(args.gradient_store_dir) / f"shortlist-{rows}"
        write_gradients(gradients_path, new, args.gradient_dim, args.seed)
        target_gradients = torch.nn.functional.normalize(
            torch.randn(args.targets, args.gradient_dim, generator=torch.Generator().manual_seed(args.seed + 3)), dim=1)
        sampler.peak = max(before_write, sampler.read())  # the synthetic writer's memory is not the library's
        excluded = time.perf_counter() - paused
        scored = time.perf_counter()
        new_scores = store_scores(VectorStore.open(gradients_path), torch.arange(new_rows), target_gradients,
                                  args.chunk_rows)
        shortlist_seconds = time.perf_counter() - scored
        in_shortlist = torch.isin(landmarks, shortlist)
        exact_rows = torch.cat([landmarks, new])
        exact_scores = torch.cat([torch.where(in_shortlist[:, None], scores.float(), known), new_scores])
        shutil.rmtree(gradients_path, ignore_errors=True)
    else:
        exact_rows, exact_scores = landmarks, known
    if retained is not None:
        chosen = retained.replaced(exact_rows, exact_scores).select(budget, seed=args.seed)
    else:
        chosen = stream_select(source, regressor, budget, "round_robin", seed=args.seed, exact_rows=exact_rows,
                               exact_scores=exact_scores, **stream)
    total = time.perf_counter() - start - excluded
    generation = source.generation_seconds if mode == "on_the_fly" else 0.0
    peak = sampler.stop()

    # Accuracy of the float32 kernel against float64, on the first block (not timed).
    head_rows = min(args.block_rows, rows)
    head = source[0:head_rows] if mode == "on_the_fly" else torch.from_numpy(source.read(0, head_rows))
    single = predict_scores(head, regressor, block_rows=args.block_rows).double()
    double = predict_scores(head, regressor, block_rows=args.block_rows, compute_dtype=torch.float64).double()
    seconds = total - generation
    passes = 2 if plan.shortlist and retained is None else 1
    return {
        "rows": rows,
        "path": args.path,
        "passes": passes,
        "landmarks": plan.landmarks, "shortlist_rows": plan.shortlist, "exact_gradient_rows": plan.landmarks + new_rows,
        "shortlist_scoring_seconds": shortlist_seconds,
        "seconds": seconds,
        "peak_rss_anon_mb": peak,
        "baseline_rss_anon_mb": baseline,
        "fit_seconds": fit_seconds,
        "select_seconds": total - fit_seconds - generation,
        "on_the_fly_generation_seconds_subtracted": generation,
        "rows_per_second": rows / seconds,
        "kernel_gflops": passes * 2.0 * rows * args.dim * len(landmarks) / (total - fit_seconds - generation) / 1e9,
        "budget": budget,
        "data": mode,
        "selected_sha256": hashlib.sha256(chosen.numpy().tobytes()).hexdigest()[:16],
        "float32_max_abs_error_over_score_std": ((single - double).abs().max() / double.std()).item(),
    }


def machine() -> dict:
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "memory_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            / 2**30}


def time_exponent(results: list[dict]) -> float | None:
    """Least-squares slope of log(seconds) over log(rows); None with fewer than two sizes."""
    if len(results) < 2:
        return None
    x = np.log([r["rows"] for r in results])
    y = np.log([r["seconds"] for r in results])
    return float(np.polyfit(x, y, 1)[0])


def run_size(args: argparse.Namespace, rows: int) -> dict:
    """Prepare the data for one size and measure it in a fresh subprocess."""
    store_bytes = rows * args.dim * 2
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store_path = data_dir / f"pool-{rows}-{args.dim}"
    fits = (store_path / "manifest.json").exists() or store_bytes + 4 * 2**30 < shutil.disk_usage(data_dir).free
    mode = "stored" if rows <= args.stored_max_rows and fits else "on_the_fly"
    write_seconds = None
    if mode == "stored":
        print(f"[{rows} rows] writing the fp16 store ({store_bytes / 2**30:.1f} GiB) to {store_path}", flush=True)
        write_seconds = write_store(store_path, SyntheticPool(rows, args.dim, args.seed), args.seed)
        evict_from_page_cache(store_path)
    print(f"[{rows} rows] measuring ({mode})", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        command = [sys.executable, __file__, "--child-rows", str(rows), "--child-mode", mode, "--child-out", str(out),
                   "--child-store", str(store_path) if mode == "stored" else "", *args.forwarded]
        subprocess.run(command, check=True)
        result = json.loads(out.read_text())
    result["store_write_seconds"] = write_seconds
    result["store_bytes"] = store_bytes if mode == "stored" else 0
    if mode == "stored" and not args.keep_data:
        shutil.rmtree(store_path)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here (atomically)")
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="comma-separated pool sizes (rows)")
    parser.add_argument("--max-seconds", type=float, default=2400.0,
                        help="skip a size whose time, extrapolated from the previous size, exceeds this")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "hf_influence_scale"))
    parser.add_argument("--stored-max-rows", type=int, default=1_000_000,
                        help="larger pools are generated on the fly instead of stored (also when the disk is short)")
    parser.add_argument("--keep-data", action="store_true", help="keep the stores (default: delete after measuring)")
    model = parser.add_argument_group("problem (forwarded to the measuring subprocess)")
    model.add_argument("--dim", type=int, default=4096, help="embedding dimension")
    model.add_argument("--landmarks", type=int, default=4096)
    model.add_argument("--targets", type=int, default=300)
    model.add_argument("--budget", type=float, default=0.05, help="fraction of the pool to select")
    model.add_argument("--chunk-rows", type=int, default=16384)
    model.add_argument("--block-rows", type=int, default=2048)
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--path", choices=("default", "regression"), default="default",
                       help="the library's default path (cost-bounded shortlist) or the regression alone")
    model.add_argument("--exact-fraction", type=float, default=InfluenceDistillationConfig.exact_gradient_fraction,
                       help="exact_gradient_fraction of the default path")
    model.add_argument("--gradient-dim", type=int, default=8192, help="gradient dimension (the default projection)")
    model.add_argument("--gradient-store-dir", default=os.path.join(tempfile.gettempdir(), "hf_influence_scale"))
    for name in ("--child-rows", "--child-mode", "--child-out", "--child-store"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                      ("dim", "landmarks", "targets", "budget", "chunk_rows", "block_rows", "seed", "path",
                       "exact_fraction", "gradient_dim", "gradient_store_dir")]

    if args.child_rows is not None:
        result = measure(args, int(args.child_rows), args.child_mode, args.child_store or None)
        Path(args.child_out).write_text(json.dumps(result))
        return

    sizes = sorted(int(size) for size in args.sizes.split(","))
    results, skipped = [], []
    load_before = os.getloadavg()
    for rows in sizes:
        if results:
            # The fit does not depend on the pool size; the streaming part is linear in it.
            last = results[-1]
            estimate = last["fit_seconds"] + (last["seconds"] - last["fit_seconds"]) * rows / last["rows"]
            if estimate > args.max_seconds:
                skipped.append({"rows": rows, "estimated_seconds": estimate,
                                "reason": f"estimated {estimate:.0f} s > --max-seconds {args.max_seconds:.0f}"})
                print(f"[{rows} rows] skipped: {skipped[-1]['reason']}", flush=True)
                continue
        results.append(run_size(args, rows))
        r = results[-1]
        print(f"[{rows} rows] {r['seconds']:.1f} s (fit {r['fit_seconds']:.1f} s), peak RssAnon "
              f"{r['peak_rss_anon_mb']:.0f} MB (baseline {r['baseline_rss_anon_mb']:.0f}), "
              f"{r['kernel_gflops']:.0f} GFLOP/s in the kernel, data {r['data']}", flush=True)

    exponent = time_exponent(results)
    print(f"\n{'rows':>10} {'data':>10} {'seconds':>9} {'fit s':>6} {'peak RssAnon MB':>16} {'rows/s':>9}")
    for r in results:
        print(f"{r['rows']:>10} {r['data']:>10} {r['seconds']:>9.1f} {r['fit_seconds']:>6.1f} "
              f"{r['peak_rss_anon_mb']:>16.0f} {r['rows_per_second']:>9.0f}")
    for s in skipped:
        print(f"{s['rows']:>10} {'skipped':>10} {s['estimated_seconds']:>9.0f} (estimated)")
    print(f"time exponent (log-log slope): {exponent if exponent is None else round(exponent, 3)}")
    million = next((r for r in results if r["rows"] == 1_000_000), None)
    report = {
        "machine": machine(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "problem": {"path": args.path, "exact_gradient_fraction": args.exact_fraction if args.path == "default" else None,
                    "gradient_dim": args.gradient_dim, "dim": args.dim, "landmarks": args.landmarks, "targets": args.targets,
                    "budget_fraction": args.budget, "rule": "round_robin", "kernel": "rbf",
                    "compute_dtype": "float32", "store_dtype": "float16", "chunk_rows": args.chunk_rows,
                    "block_rows": args.block_rows, "seed": args.seed},
        "results": results,
        "skipped": skipped,
        "time_exponent": exponent,
        "targets": {"1M_rows_seconds_max": 600, "1M_rows_peak_rss_anon_mb_max": 4096, "time_exponent_max": 1.0,
                    "1M_met": None if million is None else bool(million["seconds"] <= 600
                                                                 and million["peak_rss_anon_mb"] <= 4096)},
        "notes": "seconds = LandmarkRegressor.fit + stream_select (model passes and synthetic data generation "
                 "excluded); peak_rss_anon_mb sampled every 5 ms in a fresh subprocess per size; stored pools are "
                 "evicted from the page cache before the measurement (read from disk through the memory maps); "
                 "on_the_fly pools are regenerated per block with the generation time subtracted.",
    }
    if args.json:
        # Results of the other path from an earlier run are kept beside this run's (measured before "path"
        # existed, they are the regression path's).
        earlier = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
        kept = [dict(r, path=r.get("path", "regression"), machine=earlier.get("machine"),
                     problem=earlier.get("problem")) for r in earlier.get("results", []) + earlier.get("other_paths", [])
                if r.get("path", "regression") != args.path]
        report["other_paths"] = kept
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
