"""InfluenceNetwork inference throughput: the factorised predict against the plain forward on concatenated pairs.

    python benchmarks/network_predict.py --json benchmarks/results/network_predict.json [--n 100000 --m 300 --e 384]

Synthetic L2-normalised embeddings (pool [n, e], target [m, e]) through an InfluenceNetwork with one hidden layer
of h units, timed as pairs per second:
  predict         InfluenceNetwork.predict: A E_S + b1 and B E_T once, then per pair a fused max and a matvec,
                  in 1 MB tiles on one thread (the library's choice)
  top_candidates  InfluenceNetwork.top_candidates (k=100), streaming top-k without the [n, m] matrix
and, for each --threads count (torch intra-op threads), the alternatives behind that choice:
  factorised      the same tiles as predict, on that many threads
  add_relu        the textbook tile instead of the fused max (add, ReLU, matvec on [t, m, h])
  naive           the module's forward on [e_i ; e_j] for every pair of a --naive-rows sample of the pool
Every method is run --repeats times and the median kept. Target (issue): predict >= 20M pairs/s on the 2-core
CPU for e=384, h=100.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine_info import cpu_model
from torch import Tensor

from hf_influence.networks.network import InfluenceNetwork


def machine() -> dict:
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "default_threads": torch.get_num_threads()}


def add_relu_predict(network: InfluenceNetwork, pool: Tensor, target: Tensor, tile: int = 8) -> Tensor:
    """The factorised predict with an add + ReLU tile instead of the fused maximum (the measured alternative)."""
    first, e = network.hidden[0], network.embedding_dim
    scale = network.label_max - network.label_min
    weight = network.output.weight[0] * scale
    bias = network.output.bias[0] * scale + network.label_min
    pool_part = torch.addmm(first.bias, pool, first.weight[:, :e].T)
    target_part = target @ first.weight[:, e:].T
    (n, h), m = pool_part.shape, target.shape[0]
    scores = torch.empty(n, m)
    buffer = torch.empty(tile, m, h)
    for start in range(0, n, tile):
        work = buffer[: min(tile, n - start)]
        torch.add(pool_part[start : start + tile, None, :], target_part, out=work).relu_()
        torch.mv(work.view(-1, h), weight, out=scores[start : start + tile].view(-1))
    return scores.add_(bias)


def naive_predict(network: InfluenceNetwork, pool: Tensor, target: Tensor, chunk_rows: int = 64) -> Tensor:
    """forward([e_i ; e_j]) for every pair, chunk_rows pool rows at a time (each chunk is [chunk_rows * m, 2e])."""
    scale = network.label_max - network.label_min
    n, m = pool.shape[0], target.shape[0]
    scores = torch.empty(n, m)
    for start in range(0, n, chunk_rows):
        rows = pool[start : start + chunk_rows]
        pairs = torch.cat([rows[:, None].expand(-1, m, -1), target[None].expand(rows.shape[0], -1, -1)], dim=-1)
        scores[start : start + chunk_rows] = network(pairs.reshape(-1, pairs.shape[-1])).view(-1, m)
    return scores * scale + network.label_min


def factorised_predict(network: InfluenceNetwork, pool: Tensor, target: Tensor) -> Tensor:
    """predict's tiles without its one-thread pinning, so that torch's thread count applies."""
    score = network._pair_scorer(target)
    scores = torch.empty(pool.shape[0], target.shape[0])
    score(pool, scores)
    return scores


def median_seconds(function, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--n", type=int, default=100_000, help="pool rows")
    parser.add_argument("--m", type=int, default=300, help="target rows")
    parser.add_argument("--e", type=int, default=384, help="embedding dimension")
    parser.add_argument("--h", type=int, default=100, help="hidden units")
    parser.add_argument("--k", type=int, default=100, help="top_candidates per target")
    parser.add_argument("--naive-rows", type=int, default=512, help="pool rows of the naive sample")
    parser.add_argument("--threads", default=None, help="comma-separated torch thread counts (default: 1 and torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    default_threads = {1, torch.get_num_threads()}
    threads = sorted({int(count) for count in args.threads.split(",")} if args.threads else default_threads)

    info = machine()  # before the thread counts below change torch's
    generator = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(args.n, args.e, generator=generator), dim=1)
    target = torch.nn.functional.normalize(torch.randn(args.m, args.e, generator=generator), dim=1)
    network = InfluenceNetwork(embedding_dim=args.e, hidden_sizes=[args.h], label_min=-1.0, label_max=2.0)
    sample = pool[: args.naive_rows]
    with torch.no_grad():
        # The factorised path must agree with the plain forward before its speed means anything.
        naive = naive_predict(network, sample, target)
        error = (network.predict(sample, target) - naive).abs().max().item()
        error_add_relu = (add_relu_predict(network, sample, target) - naive).abs().max().item()

    pairs, sample_pairs = args.n * args.m, sample.shape[0] * args.m
    with torch.no_grad():
        library = {
            "predict": pairs / median_seconds(lambda: network.predict(pool, target), args.repeats),
            "top_candidates": pairs / median_seconds(lambda: network.top_candidates(pool, target, args.k),
                                                     args.repeats),
        }
    print(", ".join(f"{name} {value / 1e6:.1f}M pairs/s" for name, value in library.items()))
    runs = []
    for count in threads:
        torch.set_num_threads(count)
        with torch.no_grad():
            timings = {
                "factorised": pairs / median_seconds(lambda: factorised_predict(network, pool, target), args.repeats),
                "add_relu": pairs / median_seconds(lambda: add_relu_predict(network, pool, target), args.repeats),
                "naive": sample_pairs / median_seconds(lambda: naive_predict(network, sample, target), args.repeats),
            }
        runs.append({"threads": count, "pairs_per_second": timings})
        print(f"threads={count}: " + ", ".join(f"{name} {value / 1e6:.2f}M pairs/s" for name, value in timings.items()))

    best_naive = max(run["pairs_per_second"]["naive"] for run in runs)
    print(f"predict / best naive = {library['predict'] / best_naive:.0f}x")
    result = {"machine": info, "n": args.n, "m": args.m, "e": args.e, "h": args.h, "k": args.k,
              "naive_rows": sample.shape[0], "repeats": args.repeats,
              "max_abs_error_vs_naive": {"predict": error, "add_relu": error_add_relu},
              "pairs_per_second": library, "predict_speedup_vs_best_naive": library["predict"] / best_naive,
              "runs": runs}
    print(f"max |predict - naive| = {error:.2e} (labels span 3.0); machine: {info['cpu']}, "
          f"torch {torch.__version__}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
