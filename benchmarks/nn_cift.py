"""NN-CIFT on the real pool: an Influence Distillation oracle distilled into an InfluenceNetwork.

    python benchmarks/nn_cift.py --json benchmarks/results/nn_cift_cpu.json [--pool-rows 1000 --target-rows 40]

Pool: a seeded slice of ../shared/data/pool.jsonl.gz; target: seeded GSM8K test rows; model: SmolLM2-135M-Instruct
(offline copy); encoder: all-MiniLM-L6-v2 (offline copy). The oracle is first-order Influence Distillation with
every block row's gradient (`influence_distillation_exact`, GD: no warm-up, so blocks are consistent and cheap).
With the default unit-normalised gradients and no Adam state these values are gradient cosines, exactly what
LESS computes without a warm-up (checked: the same labels bit for bit), so LESS needs no run of its own here.

Reported:
- Q1..Q4 MSE (labels min-max normalised), Q4 Spearman, against predict-the-mean / random, measured on an
  evaluation block: the training block's rows and columns plus fresh ones (`evaluation_fraction`).
- cost split of NN-CIFT (embed / oracle / fit / predict seconds) and `cost_reduction` = 1 - NN-CIFT seconds /
  oracle-on-everything seconds. The oracle on every pool row is not run (it is what NN-CIFT avoids, and it
  would take hours on this CPU): its time is the measured oracle seconds per pool row of the evaluation block
  times the pool size, plus the measured per-target cost times the target count. Exact ID is linear in
  both, so this is an estimate from measured rates, and the JSON says so.
- `predict_pairs_per_s`: the network's factorised prediction on a 100k x 300 pool x target matrix of random
  embeddings (the pool size does not change the per-pair cost).
- Two references for Q4 Spearman, to tell a weak fit from a weak signal: `q4_spearman_ridge_baseline`, an
  additive linear model fitted on the same training block (ridge from a row's embedding to its mean label over
  the block columns, plus ridge from a column's embedding to its mean over the block rows; ridge chosen by
  leave-one-out); and `q4_spearman_additive_ceiling`, the Spearman of Q4's own row mean + column mean (computed
  from the Q4 labels themselves), the best any model that predicts a row effect plus a column effect can do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import scipy.stats
import torch
from safetensors.torch import load_file, save_file
from selection_quality import DEFAULT_DATA_DIR, load_data, machine

from hf_influence import DEFAULT_MODEL, load_model
from hf_influence.network import InfluenceNetwork
from hf_influence.nn_cift_pipeline import NNCIFTConfig, nn_cift
from hf_influence.oracles import MethodOracle
from hf_influence.store import atomic_write_json, fingerprint_dataset


class TimedOracle:
    """Wraps an oracle to record the seconds and the block shape of every call (training and evaluation).

    With a cache folder, each block's labels and its measured seconds are kept (safetensors + JSON, keyed by the
    rows' fingerprints and the oracle identity), so that reruns that change only the network reuse the oracle
    work; a reused call reports the seconds measured when it was computed, and says `cached`.
    """

    def __init__(self, oracle, cache_dir: Path | None = None):
        self.oracle, self.calls, self.cache_dir = oracle, [], cache_dir
        self.name, self.pointwise = oracle.name, oracle.pointwise

    def compute_block(self, pool_rows, target_rows=None):
        key = hashlib.sha256(json.dumps([fingerprint_dataset(pool_rows), None if target_rows is None else
                                         fingerprint_dataset(target_rows), self.oracle.identity()],
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        if self.cache_dir is not None and (self.cache_dir / f"{key}.json").exists():
            record = json.loads((self.cache_dir / f"{key}.json").read_text())
            self.calls.append({**record, "cached": True})
            return load_file(str(self.cache_dir / f"{key}.safetensors"))["labels"]
        start = time.perf_counter()
        block = self.oracle.compute_block(pool_rows, target_rows)
        record = {"rows": block.shape[0], "columns": block.shape[1], "seconds": time.perf_counter() - start}
        self.calls.append(record)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            save_file({"labels": block.contiguous()}, str(self.cache_dir / f"{key}.safetensors"))
            atomic_write_json(self.cache_dir / f"{key}.json", record)
        return block

    def identity(self):
        return self.oracle.identity()


def ridge_loo(features: torch.Tensor, values: torch.Tensor, alphas=tuple(10.0 ** p for p in range(-3, 4))):
    """Ridge regression (with intercept) with alpha chosen by exact leave-one-out error; returns predict(x)."""
    x, y = features.double(), values.double()
    mean_x, mean_y = x.mean(0), y.mean()
    xc, yc = x - mean_x, y - mean_y
    best = None
    for alpha in alphas:
        # Hat matrix in the sample space: H = X (X^T X + a I)^-1 X^T = X X^T (X X^T + a I)^-1 (n <= e here).
        gram = xc @ xc.T
        hat = gram @ torch.linalg.inv(gram + alpha * torch.eye(len(x), dtype=x.dtype))
        loo = ((yc - hat @ yc) / (1 - hat.diagonal())).square().mean()
        if best is None or loo < best[0]:
            best = (loo, alpha)
    alpha = best[1]
    weights = xc.T @ torch.linalg.solve(xc @ xc.T + alpha * torch.eye(len(x), dtype=x.dtype), yc)
    return lambda new: ((new.double() - mean_x) @ weights + mean_y)


def q4_references(result) -> dict:
    """Q4 Spearman of the ridge additive baseline and of the additive ceiling (module docstring)."""
    rows, columns, labels = result.evaluation_block
    seen_rows, seen_columns = len(result.block_rows), len(result.block_columns)
    block = result.block_labels.double()
    row_model = ridge_loo(result.pool_embeddings[result.block_rows], block.mean(1))
    column_model = ridge_loo(result.target_embeddings[result.block_columns], block.mean(0))
    fresh_rows, fresh_columns = rows[seen_rows:], columns[seen_columns:]
    predicted = (row_model(result.pool_embeddings[fresh_rows])[:, None]
                 + column_model(result.target_embeddings[fresh_columns])[None, :])
    q4 = labels[seen_rows:, seen_columns:].double()
    ceiling = q4.mean(1, keepdim=True) + q4.mean(0, keepdim=True)
    return {"q4_spearman_ridge_baseline": scipy.stats.spearmanr(predicted.flatten(), q4.flatten()).statistic,
            "q4_spearman_additive_ceiling": scipy.stats.spearmanr(ceiling.flatten(), q4.flatten()).statistic}


def predict_throughput(embedding_dim: int, rows: int = 100_000, targets: int = 300) -> float:
    network = InfluenceNetwork(embedding_dim=embedding_dim, label_min=0.0, label_max=1.0)
    generator = torch.Generator().manual_seed(0)
    pool, target = torch.randn(rows, embedding_dim, generator=generator), torch.randn(targets, embedding_dim,
                                                                                      generator=generator)
    network.predict(pool[:1000], target)  # warm-up of the kernels
    start = time.perf_counter()
    network.predict(pool, target)
    return rows * targets / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--pool-rows", type=int, default=1000)
    parser.add_argument("--target-rows", type=int, default=40)
    parser.add_argument("--block-fraction", type=float, default=0.05)
    parser.add_argument("--evaluation-fraction", type=float, default=0.05)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle-cache", type=Path, default=None,
                        help="keep / reuse oracle blocks here (reruns that change only the network)")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found")
        return 0
    pool, target = load_data(args.data_dir, args.pool_rows, args.target_rows, args.seed)
    model, tokenizer = load_model(DEFAULT_MODEL)
    oracle = TimedOracle(MethodOracle("influence_distillation_exact", model=model, tokenizer=tokenizer,
                                      optimizer_state="gd", max_length=args.max_length, response_column="solution",
                                      show_progress=False), cache_dir=args.oracle_cache)
    config = NNCIFTConfig(block_fraction=args.block_fraction, evaluation_fraction=args.evaluation_fraction,
                          network_epochs=args.epochs, network_learning_rate=args.learning_rate,
                          network_patience=20, nn_cift_seed=args.seed, min_block_rows=16)
    result = nn_cift(pool, target, config, oracle=oracle, show_progress=False)
    evaluation_call = oracle.calls[-1]  # [training block, evaluation block]
    # Oracle cost model from the evaluation block (rows x columns measured together): per pool row and per target.
    seconds_per_pair_row = evaluation_call["seconds"] / (evaluation_call["rows"] + evaluation_call["columns"])
    oracle_all_seconds = seconds_per_pair_row * (len(pool) + len(target))
    # The oracle's seconds as measured when its block was computed (a cached block took none in this run).
    seconds = {**result.seconds, "oracle": oracle.calls[0]["seconds"], "evaluation": evaluation_call["seconds"]}
    nn_cift_seconds = sum(value for key, value in seconds.items() if key != "evaluation")
    evaluation = result.evaluation
    report = {
        **{f"{quadrant.lower()}_mse": evaluation[quadrant]["mse"] for quadrant in ("Q1", "Q2", "Q3", "Q4")},
        "q4_spearman": evaluation["Q4"]["spearman"],
        "q4_mean_baseline_mse": evaluation["Q4"]["mean_baseline_mse"],
        "q4_random_baseline_mse": evaluation["Q4"]["random_baseline_mse"],
        **q4_references(result),
        "evaluation": evaluation,
        "predict_pairs_per_s": predict_throughput(result.pool_embeddings.shape[1]),
        "cost_reduction": 1 - nn_cift_seconds / oracle_all_seconds,
        "nn_cift_seconds": seconds,
        "oracle_calls": oracle.calls,
        "oracle_all_seconds_estimated": oracle_all_seconds,
        "oracle_all_seconds_note": "estimated: measured oracle seconds per (pool + target) row of the evaluation "
                                   "block x (pool rows + target rows); exact ID is linear in both",
        "config": {**vars(args), "json": str(args.json), "data_dir": str(args.data_dir), "pool": len(pool),
                   "target": len(target), "block_rows": len(result.block_rows),
                   "block_columns": len(result.block_columns)},
        "machine": machine(),
    }
    print(f"NN-CIFT (ID first-order oracle) on {len(pool)} pool x {len(target)} GSM8K rows, block "
          f"{len(result.block_rows)} x {len(result.block_columns)}")
    print(f"{'quadrant':<10}{'MSE':>10}{'Spearman':>10}{'mean-baseline MSE':>20}{'random MSE':>12}")
    for quadrant in ("Q1", "Q2", "Q3", "Q4"):
        row = evaluation[quadrant]
        print(f"{quadrant:<10}{row['mse']:>10.4f}{row['spearman']:>10.3f}{row['mean_baseline_mse']:>20.4f}"
              f"{row['random_baseline_mse']:>12.4f}")
    print(f"Q4 Spearman references: ridge additive baseline {report['q4_spearman_ridge_baseline']:.3f}, additive "
          f"ceiling (Q4's own row + column means) {report['q4_spearman_additive_ceiling']:.3f}")
    print("cost split: " + ", ".join(f"{key} {value:.1f} s" for key, value in seconds.items()))
    print(f"oracle on everything (estimated) {oracle_all_seconds:.0f} s -> cost reduction {report['cost_reduction']:.1%}")
    print(f"prediction: {report['predict_pairs_per_s'] / 1e6:.1f}M pairs/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
