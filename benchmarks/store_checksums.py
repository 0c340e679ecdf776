"""What sealing a store costs: opening a complete store with and without its per-file SHA-256 verification.

    python benchmarks/store_checksums.py --json benchmarks/results/store_checksums_cpu.json [--sizes_mb 64,512]

For each size, a float32 store of 8,192-dimensional rows (a gradient store's shape) is written and sealed in a
temporary folder; then, interleaved over repeats, `VectorStore.open` is timed on the sealed store (every shard,
done.npy and row_ids.npy hashed) and on a copy of its manifest without the checksums (the memory maps only).
The median of each is kept. The files are in the page cache after the first read, so the figure is the hashing
cost; a cold read adds the disk's read time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import cpu_model  # noqa: E402

from hf_influence.extraction.store import MANIFEST_NAME, StoreSpec, VectorStore, atomic_write_json  # noqa: E402

DIM = 8192


def sealed_store(folder: Path, size_mb: int) -> Path:
    rows = size_mb * 2**20 // (DIM * 4)
    spec = StoreSpec(kind="gradients", model_id="benchmark", model_revision=None, dataset_fingerprint="x",
                     config={}, num_rows=rows, dim=DIM, shard_rows=4096)
    store = VectorStore.create_or_open(folder, spec, row_ids=np.arange(rows))
    generator = np.random.default_rng(0)
    for start in range(0, rows, 1024):
        end = min(start + 1024, rows)
        store.write(start, generator.standard_normal((end - start, DIM), dtype=np.float32))
    store.update_manifest()
    assert store.manifest.get("checksums"), "the complete store was not sealed"
    return folder


def timed_open(folder: Path) -> float:
    start = time.perf_counter()
    VectorStore.open(folder)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes_mb", default="64,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="store_checksums_") as scratch:
        for size_mb in [int(size) for size in args.sizes_mb.split(",")]:
            sealed = sealed_store(Path(scratch) / f"sealed-{size_mb}", size_mb)
            unsealed = Path(scratch) / f"unsealed-{size_mb}"
            shutil.copytree(sealed, unsealed)
            manifest = json.loads((unsealed / MANIFEST_NAME).read_text())
            del manifest["checksums"]
            atomic_write_json(unsealed / MANIFEST_NAME, manifest)
            timed_open(sealed), timed_open(unsealed)  # both in the page cache before timing
            verified, plain = [], []
            for _ in range(args.repeats):
                verified.append(timed_open(sealed))
                plain.append(timed_open(unsealed))
            bytes_hashed = sum(path.stat().st_size for path in sealed.iterdir() if path.name != MANIFEST_NAME)
            seconds = statistics.median(verified) - statistics.median(plain)
            results.append({"size_mb": size_mb, "bytes_hashed": bytes_hashed,
                            "open_verified_s": statistics.median(verified), "open_unverified_s": statistics.median(plain),
                            "verification_s": seconds, "gb_per_s": bytes_hashed / seconds / 1e9})
            shutil.rmtree(sealed), shutil.rmtree(unsealed)
    print(f"{'store':>8}{'open, verified':>16}{'open, not':>12}{'verification':>14}{'GB/s':>8}")
    for row in results:
        print(f"{row['size_mb']:>6}MB{row['open_verified_s'] * 1e3:>13.1f} ms{row['open_unverified_s'] * 1e3:>9.1f} ms"
              f"{row['verification_s'] * 1e3:>11.1f} ms{row['gb_per_s']:>8.2f}")
    report = {"benchmark": "store_checksums", "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                                          "python": platform.python_version()},
              "settings": {"dim": DIM, "dtype": "float32", "shard_rows": 4096, "repeats": args.repeats,
                           "page_cache": "warm"},
              "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
