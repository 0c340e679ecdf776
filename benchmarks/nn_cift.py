"""NN-CIFT on the real pool, version 2: which inputs let an InfluenceNetwork predict a gradient oracle on rows and
targets it never saw (quadrant Q4), at what cost, and the network the library ships, fitted on it.

    python benchmarks/nn_cift.py --cache runs/nn_cift_v2 --work-dir runs/nn_cift_v2/work \
        --json benchmarks/results/nn_cift_cpu.json [--save-network pretrained/nn-cift-id-smollm2-135m]

Data: the pool slice of the downstream benchmark of record (benchmarks/downstream.py: 4,096 fresh seeded rows of
../shared/data/pool.jsonl.gz, max_length 256) and 1,029 target rows of four tasks (340 GSM8K train, 340 MMLU test,
340 BBH, the 9 TyDiQA rows: the first rows of load_target's seed-0 draws, which that benchmark's selection and
evaluation rows exclude). 5% of the targets is 52 columns. --work-dir is a copy of that benchmark's draw-0 work
dir (warm-up, pool gradients, JVP store): the oracle's pool side is read, not recomputed. Version 1 (2,048 rows
of another slice, four oracles including DELIFT) is this file's git history and nn_cift_cpu.json's.

Oracles: influence_distillation_exact (first-order ID, every row's exact warmed-up LoRA gradient) and LESS; with
unit-normalised gradients LESS's values are ID's (checked: the matrices are equal), so LESS is reported as ID's
figures (only its selection rule differs). The oracle's whole [4,096 x 1,029] matrix is computed once, so every
quadrant is measured on every pair.

Inputs (what the network reads; each part unit-normalised per row, parts concatenated with equal weight):
- minilm: all-MiniLM-L6-v2 sentence embeddings of the row's text (the library's default encoder);
- lm<L>_mean / lm<L>_last: SmolLM2's hidden state after block L (through the final norm, as a model truncated
  to L blocks gives it), position-weighted mean over the row's tokens or the last token; L = 30 (the whole model;
  lm30_mean is the library's encoder="lm"), 15, 8, 4. A truncated model costs L/30 of a forward pass;
- jvp: the landmark regression's JVP features (the library's default JVPConfig, the warmed-up model);
- concatenations of the above.
Cost, measured side by side in one run on the same 64 pool rows and 64 target rows (seconds per row, with the
benchmark machine otherwise idle): a warmed-up exact gradient row (the oracle), each input's pass (a truncated
forward per depth, MiniLM, JVP). NN-CIFT's cost = every row's input (pool and targets) + the oracle on the block's
rows and columns + fit + predict; the oracle's = every row's gradient. cost_reduction = 1 - NN-CIFT's / oracle's.
The warm-up (the same on both sides) is left out of both.

Per input, the network settings of SWEEP: the library's NNCIFTConfig, early stopping on held-out rows and columns
of the block, the interaction term with per-column normalisation, larger blocks (10% and 20% of the rows: more
oracle rows, so a smaller cost reduction). Reported per input and setting: Q1-Q4 MSE (min-max normalised labels)
against the block-mean baseline, Spearman over the flattened quadrant, the mean per-target Spearman, top-10
overlap, and the cost reduction; per input, the ridge additive reference and the additive ceiling on Q4.

The shipped network (--save-network): the input with the best Q4 Spearman among those the library computes
(MiniLM; encoder="lm" with lm_pooling and lm_blocks: every single lm<L>_<pooling>) and whose cost reduction is
>= 75%, fitted with early stopping on held-out block rows
and columns on a block whose columns exclude one whole task (BBH), so that its card's Q4 figures include a task it
never saw; its card states those figures (also in the JSON's `pretrained`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets
import scipy.stats
import torch
import torch.nn.functional as F
from downstream import Settings as DownstreamSettings
from downstream import load_data as downstream_data
from safetensors.torch import load_file, save_file
from selection_quality import DEFAULT_DATA_DIR, machine

from hf_influence import DEFAULT_MODEL, add_lora, compute_scores, load_model, load_target
from hf_influence.artifacts.scores import json_safe
from hf_influence.extraction.extract import extract_gradients, extract_jvp_embeddings
from hf_influence.extraction.gradients import causal_lm_parts, first_blocks
from hf_influence.extraction.jvp import JVPConfig
from hf_influence.extraction.store import VectorStore, atomic_write_json
from hf_influence.formatting import FormattingConfig, format_dataset, pad_batch
from hf_influence.models import LoraSettings
from hf_influence.networks.encoders import DEFAULT_ENCODER, encode_rows, load_encoder, row_embedder
from hf_influence.networks.network import InfluenceNetwork, column_spearman, complement, standardize_columns, topk_overlap
from hf_influence.networks.nn_cift_pipeline import NNCIFTConfig
from hf_influence.optimizer_warmup import WarmupConfig, warmup
from hf_influence.rds_embeddings import LM_ENCODER, lm_pooled_embeddings, pool_hidden_states

MAX_LENGTH, SEED, COST_ROWS = 256, 0, 64
# task -> (rows, load_target options): 1,029 targets, so that u = 5% of them is 52 columns.
TARGET_DRAW = {"gsm8k": (340, {}), "mmlu": (340, {"held_out": True}), "bbh": (340, {}), "tydiqa": (9, {})}
ORACLES = ("influence_distillation_exact", "less")
DEPTHS = (30, 15, 8, 4)  # SmolLM2-135M has 30 blocks
LM_FEATURES = tuple(f"lm{depth}_{pooling}" for depth in DEPTHS for pooling in ("mean", "last"))
# Input name -> the features it concatenates.
INPUTS = {
    "minilm": ("minilm",),
    "lm30_mean": ("lm30_mean",),
    "lm30_last": ("lm30_last",),
    "lm15_mean": ("lm15_mean",),
    "lm15_last": ("lm15_last",),
    "lm8_mean": ("lm8_mean",),
    "lm8_last": ("lm8_last",),
    "lm4_mean": ("lm4_mean",),
    "lm4_last": ("lm4_last",),
    "lm8_mean+last": ("lm8_mean", "lm8_last"),
    "lm15_mean+last": ("lm15_mean", "lm15_last"),
    "jvp": ("jvp",),
    "minilm+lm8_mean": ("minilm", "lm8_mean"),
    "minilm+lm30_mean": ("minilm", "lm30_mean"),
    "minilm+jvp": ("minilm", "jvp"),
    "lm8_mean+jvp": ("lm8_mean", "jvp"),
    "minilm+lm8_mean+jvp": ("minilm", "lm8_mean", "jvp"),
}

# Network settings, as NNCIFTConfig overrides (plus "rows": the block's pool rows). "default": NNCIFTConfig().
SWEEP = {
    "default": {},
    "held_out validation": {"network_validation_split": "held_out"},
    "interaction 32 + column": {"network_interaction_rank": 32, "network_label_normalization": "column"},
    "rows=410 (10%)": {"rows": 410},
    "rows=820 (20%)": {"rows": 820},
}
HELD_OUT_TASK = "bbh"
# The data's licences (../shared/data/README.md), for the shipped network's card.
SOURCE_LICENCES = {
    "t0": "P3/T0 prompted tasks: Apache-2.0 repository, per-dataset licences",
    "flan_cot": "FLAN-v2 chain-of-thought: Apache-2.0, per-dataset licences",
    "codealpaca": "Code Alpaca: CC BY-NC 4.0", "dolly_hhrlhf_small": "Dolly + HH-RLHF: CC BY-SA 3.0 / MIT",
    "alpaca_eval_gpt4": "AlpacaEval with GPT-4 answers: CC BY-NC 4.0", "alpaca": "Stanford Alpaca: CC BY-NC 4.0",
    "user_oriented": "Self-Instruct expert tasks: Apache-2.0", "self_instruct_seed": "Self-Instruct seeds: Apache-2.0",
    "oasst_sample": "OpenAssistant: CC BY 4.0",
}
TASK_LICENCES = {"gsm8k": "GSM8K train, MIT", "mmlu": "MMLU test, MIT", "bbh": "BIG-Bench Hard, MIT",
                 "tydiqa": "TyDiQA, Apache-2.0"}


def library_encoder(input_name: str) -> dict | None:
    """The NNCIFTConfig encoder options that compute an input in the library (so select_with_network reads it),
    or None (JVP features, concatenations)."""
    if input_name == "minilm":
        return {"encoder": DEFAULT_ENCODER}
    if input_name.startswith("lm") and "+" not in input_name:
        depth, pooling = input_name[2:].split("_")
        return {"encoder": LM_ENCODER, "lm_pooling": pooling, "lm_blocks": None if int(depth) == DEPTHS[0] else
                int(depth)}
    return None


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_benchmark_rows(data_dir: Path, target_share: float):
    """The downstream benchmark's pool slice and the concatenated target rows (each task's count times
    target_share, at least 2)."""
    pool = downstream_data(data_dir, DownstreamSettings()).pool
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


def fit_network(config: NNCIFTConfig, pool_embeddings, target_embeddings, rows, columns, block, **identity):
    """A pairwise InfluenceNetwork with config's settings, fitted on block [rows x columns]; identity: what a saved
    network records (embedding_model, oracle, ...). Returns (network, fit seconds, history)."""
    network = InfluenceNetwork(embedding_dim=pool_embeddings.shape[1], hidden_sizes=list(config.network_hidden_sizes),
                               seed=config.nn_cift_seed, interaction_rank=config.network_interaction_rank,
                               label_normalization=config.network_label_normalization, **identity)
    start = time.perf_counter()
    history = network.fit(pool_embeddings[rows], target_embeddings[columns], block, epochs=config.network_epochs,
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


def hidden_state_features(model, formatted, pad_token_id: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """LM_FEATURES of every formatted row from one forward pass of the base model: for each depth L, the hidden
    state after block L through the final norm (what `first_blocks(model, L)` returns), pooled by the
    position-weighted mean (rds_embeddings.pooled_batch's weights) and at the last real token; unit rows."""
    decoder, _ = causal_lm_parts(model)
    features = {name: [] for name in LM_FEATURES}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(formatted), batch_size):
            batch = pad_batch(list(formatted.select(range(start, min(start + batch_size, len(formatted))))),
                              pad_token_id)
            mask = batch["attention_mask"]
            output = decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False,
                             output_hidden_states=True)
            for depth in DEPTHS:
                hidden = output.last_hidden_state if depth == DEPTHS[0] else decoder.norm(output.hidden_states[depth])
                for pooling in ("mean", "last"):
                    features[f"lm{depth}_{pooling}"].append(pool_hidden_states(hidden, mask, pooling))
    return {name: torch.cat(parts) for name, parts in features.items()}


def check_truncation(model, formatted, pad_token_id: int) -> float:
    """Largest |difference| between the library's truncated encoder (`lm_pooled_embeddings` with num_blocks) and
    the one-pass feature, over depths, poolings and the first 8 rows: the features are what the library computes."""
    rows = formatted.select(range(min(8, len(formatted))))
    one_pass = hidden_state_features(model, rows, pad_token_id)
    return max((lm_pooled_embeddings(model, rows, pad_token_id=pad_token_id, show_progress=False, pooling=pooling,
                                     num_blocks=depth) - one_pass[f"lm{depth}_{pooling}"]).abs().max().item()
               for depth in DEPTHS for pooling in ("mean", "last"))


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_costs(cache_dir: Path, warmed, base, tokenizer, encoder, pool, targets, formatted_pool,
                  formatted_targets) -> dict:
    """Seconds per row of every input and of the oracle's gradient on the same COST_ROWS pool and target rows, one
    after the other in this process (module docstring)."""
    generator = torch.Generator().manual_seed(SEED)
    pad = tokenizer.pad_token_id
    rates = {}
    for side, rows, formatted in (("pool", pool, formatted_pool), ("targets", targets, formatted_targets)):
        sample = torch.randperm(len(rows), generator=generator)[:COST_ROWS].tolist()
        raw, tokens = rows.select(sample), formatted.select(sample)
        folder = cache_dir / "cost_stores" / side
        seconds = {
            # (the engine's pool side also applies the warm-up's Adam preconditioner: an elementwise product,
            # negligible beside the backward pass)
            "gradient": timed(lambda: extract_gradients(warmed, tokens, folder / "gradients", overwrite=True,
                                                        pad_token_id=pad, show_progress=False)),
            "jvp": timed(lambda: extract_jvp_embeddings(warmed, tokens, folder / "jvp", JVPConfig(), pad_token_id=pad,
                                                        overwrite=True, show_progress=False)),
            "minilm": timed(lambda: encode_rows(raw, encoder, show_progress=False)),
        }
        decoder, _ = causal_lm_parts(base)
        for depth in DEPTHS:
            def forward(depth=depth):
                with torch.no_grad(), first_blocks(base, depth):
                    for start in range(0, len(tokens), 8):
                        batch = pad_batch(list(tokens.select(range(start, min(start + 8, len(tokens))))), pad)
                        decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            seconds[f"lm{depth}"] = timed(forward)
        rates[side] = {name: value / len(sample) for name, value in seconds.items()}
        log(f"cost per {side} row: " + ", ".join(f"{k} {v:.3f} s" for k, v in rates[side].items()))
    return rates


def input_seconds(parts: tuple[str, ...], rates: dict, n: int, m: int) -> float:
    """Every pool and target row's input: each distinct pass counted once (the lm features of one depth share it;
    a deeper pass gives the shallower ones too, so only the deepest lm depth is paid)."""
    lm_depths = [int(part[2:].split("_")[0]) for part in parts if part.startswith("lm")]
    passes = {part for part in parts if not part.startswith("lm")} | ({f"lm{max(lm_depths)}"} if lm_depths else set())
    return sum(rates["pool"][name] * n + rates["targets"][name] * m for name in passes)


def concatenated(features: dict, parts: tuple[str, ...], side: str) -> torch.Tensor:
    """The input: each part unit-normalised per row and scaled by 1/sqrt(parts), concatenated (unit rows)."""
    return torch.cat([F.normalize(features[part][side].float(), dim=1) for part in parts], dim=1) / math.sqrt(len(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="labels, features and costs (reruns)")
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="a copy of the downstream benchmark's <cache>/work/draw-0 (warm-up, pool gradients, "
                             "JVP store), or an empty folder (then computed here)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--target-share", type=float, default=1.0, help="share of each task's target rows (smoke)")
    parser.add_argument("--save-network", type=Path, help="folder of the shipped network (save_pretrained + card)")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found")
        return 0
    cache = Cache(args.cache)
    pool, targets = load_benchmark_rows(args.data_dir, args.target_share)
    n, m = len(pool), len(targets)
    tasks = [task.split("/")[0] for task in targets["task"]]  # the task family (BBH and MMLU rows name a subtask)
    log(f"pool {n} rows, {m} targets")

    # Three copies of SmolLM2: the oracle's (the engine adds and warms its adapter), the base model (hidden
    # states), and one warmed up here from the saved warm-up (JVP features and the gradient's cost).
    base, tokenizer = load_model(DEFAULT_MODEL)
    labels, oracle_records = {}, {}
    for name in ORACLES:
        log(f"oracle {name}: the whole matrix")
        labels[name], oracle_records[name] = cache.get(f"labels_{name}", gradient_oracle(
            name, pool, targets, args.work_dir, load_model(DEFAULT_MODEL)[0], tokenizer))
    if torch.equal(labels["less"], labels["influence_distillation_exact"]):
        # LESS's scores are exact first-order ID's here (the same warmed-up, unit-normalised gradient dot
        # products); only its selection rule differs: its networks and costs would be ID's.
        log("less: the same labels as influence_distillation_exact (its networks are ID's)")
        del labels["less"]
    full = labels["influence_distillation_exact"]

    formatting = FormattingConfig(max_length=MAX_LENGTH)
    formatted_pool = format_dataset(pool, tokenizer, formatting, show_progress=False).dataset
    formatted_targets = format_dataset(targets, tokenizer, formatting, show_progress=False).dataset
    pad = tokenizer.pad_token_id
    # The oracle's warmed-up model (its saved warm-up in work_dir): the JVP features are taken through it.
    warmed, _ = load_model(DEFAULT_MODEL)
    warmed = add_lora(warmed, LoraSettings())
    warmup(warmed, tokenizer, formatted_pool, WarmupConfig(warmup_show_progress=False),
                              cache_dir=args.work_dir / "warmup")
    encoder = load_encoder()
    features = {}
    for side, rows, formatted in (("pool", pool, formatted_pool), ("targets", targets, formatted_targets)):
        value, _ = cache.get(f"minilm_{side}", lambda rows=rows: (encode_rows(rows, encoder, show_progress=False), {}))
        features.setdefault("minilm", {})[side] = value
        for name in LM_FEATURES:
            if not (args.cache / f"{name}_{side}.json").exists():
                log(f"SmolLM2 hidden states of the {side}")
                with torch.no_grad():
                    computed = hidden_state_features(base, formatted, pad)
                for feature, tensor in computed.items():
                    cache.get(f"{feature}_{side}", lambda tensor=tensor: (tensor, {"note": "one pass for all"}))
                break
        for name in LM_FEATURES:
            features.setdefault(name, {})[side] = cache.get(f"{name}_{side}", None)[0]
        log(f"JVP features of the {side}")
        store = extract_jvp_embeddings(warmed, formatted, args.work_dir / ("jvp" if side == "pool" else "jvp_targets"),
                                       JVPConfig(), pad_token_id=pad, show_progress=False)
        features.setdefault("jvp", {})[side] = store.to_tensor()
    jvp_adapters = {VectorStore.open(args.work_dir / folder).manifest["config"]["adapter_digest"]
                    for folder in ("jvp", "jvp_targets")}
    if len(jvp_adapters) != 1:
        raise RuntimeError("the pool's and the targets' JVP features were taken through different warmed-up adapters")
    rds_store = args.work_dir / "lm_embeddings"
    check = {"truncation_max_abs_difference": check_truncation(base, formatted_pool, pad)}
    if rds_store.exists():  # the library's encoder="lm" (RDS+'s representation) is lm30_mean
        check["lm30_mean_vs_library_max_abs_difference"] = (VectorStore.open(rds_store).to_tensor()
                                                             - features["lm30_mean"]["pool"]).abs().max().item()
    log(f"checks: {check}")

    costs_file = args.cache / "costs.json"
    if not costs_file.exists():
        atomic_write_json(costs_file, measure_costs(args.cache, warmed, base, tokenizer, encoder, pool, targets,
                                                    formatted_pool, formatted_targets))
    rates = json.loads(costs_file.read_text())
    oracle_all = rates["pool"]["gradient"] * n + rates["targets"]["gradient"] * m

    column_count = math.ceil(0.05 * m)
    report = {"pool_rows": n, "target_rows": m, "block_columns": column_count,
              "target_tasks": {task: count for task, (count, _) in TARGET_DRAW.items()}, "machine": machine(),
              "cost_seconds_per_row": rates, "oracle_all_seconds": oracle_all, "checks": check,
              "oracle_record": oracle_records["influence_distillation_exact"],
              "less_labels_equal_id": "less" not in labels, "inputs": {}, "sweep": {}}
    base_config = NNCIFTConfig(oracle="influence_distillation_exact")
    # A rerun keeps the finished inputs of an earlier run of these settings (the fits are seeded: the same figures)
    earlier = json.loads(args.json.read_text()) if args.json.exists() else {}
    if earlier.get("cost_seconds_per_row") == rates and earlier.get("pool_rows") == n:
        report["sweep"], report["inputs"] = earlier.get("sweep", {}), earlier.get("inputs", {})
    for input_name, parts in INPUTS.items():
        if input_name in report["inputs"]:
            continue
        pool_x, target_x = concatenated(features, parts, "pool"), concatenated(features, parts, "targets")
        embed_seconds = input_seconds(parts, rates, n, m)
        results = {}
        for variant, overrides in SWEEP.items():
            settings = dict(overrides)
            row_count = settings.pop("rows", None)
            rows, columns = block_indices(n, m, column_count, row_count)
            config = replace(base_config, **settings)
            network, fit_seconds, history = fit_network(config, pool_x, target_x, rows, columns, full[rows][:, columns])
            start = time.perf_counter()
            predicted = network.predict(pool_x, target_x)
            predict_seconds = time.perf_counter() - start
            quadrants = quadrants_of(predicted, full, rows, columns, network.label_normalization)
            oracle_block = rates["pool"]["gradient"] * len(rows) + rates["targets"]["gradient"] * len(columns)
            seconds = {"inputs": embed_seconds, "oracle": oracle_block, "fit": fit_seconds, "predict": predict_seconds}
            results[variant] = {**summary(quadrants), "quadrants": quadrants, "nn_cift_seconds": seconds,
                                "cost_reduction": 1 - sum(seconds.values()) / oracle_all,
                                "epochs": len(history["validation_loss"]), "block_rows": len(rows),
                                "settings": overrides}
            log_variant(f"{input_name} / {variant}", results[variant])
        rows, columns = block_indices(n, m, column_count)
        report["sweep"][input_name] = results
        report["inputs"][input_name] = {
            **{key: results["default"][key] for key in ("q4_spearman", "q4_column_spearman", "q4_mse",
                                                        "q4_mse_mean_baseline", "q4_mse_below_mean_baseline",
                                                        "cost_reduction")},
            "spearman": {name: figures["spearman"] for name, figures in results["default"]["quadrants"].items()},
            "parts": list(parts), "dim": pool_x.shape[1], "input_seconds": embed_seconds,
            "q4_references": q4_references(pool_x, target_x, full[rows][:, columns], rows, columns,
                                           complement(rows, n), complement(columns, m),
                                           full[complement(rows, n)][:, complement(columns, m)]),
        }
        atomic_write_json(args.json, json_safe(report))
    report["goal"] = goal(report)
    if args.save_network:
        def identity(input_name: str) -> tuple:  # (encoder id, revision, text format) as the library records them
            options = library_encoder(input_name)
            return row_embedder(encoder if options["encoder"] == DEFAULT_ENCODER else LM_ENCODER, base, tokenizer,
                                formatting, lm_pooling=options.get("lm_pooling", "mean"),
                                lm_blocks=options.get("lm_blocks"))[1:]
        report["pretrained"] = save_network(args.save_network, report, features, full, tasks, rates, oracle_all,
                                            n, m, column_count, identity, list(pool["source"]))
    atomic_write_json(args.json, json_safe(report))
    print_table(report)
    return 0


def goal(report: dict) -> dict:
    """The issue's goal, read from the sweep: Q4 Spearman >= 0.4 with MSE below the mean baseline at >= 75% cost
    reduction; the best point that meets the cost and MSE conditions, whether or not it reaches 0.4."""
    points = [(result["q4_spearman"], name, variant) for name, results in report["sweep"].items()
              for variant, result in results.items()
              if result["cost_reduction"] >= 0.75 and result["q4_mse_below_mean_baseline"]]
    best = max(points, default=None)
    return {"rule": "q4_spearman >= 0.4, q4_mse < mean baseline, cost_reduction >= 0.75",
            "best": None if best is None else {"input": best[1], "settings": best[2], "q4_spearman": best[0]},
            "met": bool(best is not None and best[0] >= 0.4)}


def save_network(folder: Path, report: dict, features, full, tasks, rates, oracle_all, n, m, column_count,
                 identity: dict, sources: list[str]) -> dict:
    """Fit the shipped network (module docstring) on a block without HELD_OUT_TASK's columns, evaluate it on the
    whole oracle matrix (every quadrant; per task on unseen rows), save it with its card; returns what the card
    states. identity(input name) -> (encoder id, revision, text format) as `row_embedder` records them."""
    readable = [name for name in report["inputs"] if library_encoder(name) is not None]
    candidates = [(report["inputs"][name]["q4_spearman"], name) for name in readable
                  if report["inputs"][name]["cost_reduction"] >= 0.75] or [
        (report["inputs"][name]["q4_spearman"], name) for name in readable]
    _, input_name = max(candidates)
    parts = INPUTS[input_name]
    pool_x, target_x = concatenated(features, parts, "pool"), concatenated(features, parts, "targets")
    kept = torch.tensor([i for i, task in enumerate(tasks) if task != HELD_OUT_TASK])
    generator = torch.Generator().manual_seed(SEED)
    columns = kept[torch.randperm(len(kept), generator=generator)[:column_count]].sort().values
    rows, _ = block_indices(n, m, column_count)
    block_sources = Counter(sources[i].split("/")[0] for i in rows.tolist())
    config = replace(NNCIFTConfig(oracle="influence_distillation_exact"), network_validation_split="held_out")
    encoder_id, revision, text_format = identity(input_name)
    network, fit_seconds, _ = fit_network(config, pool_x, target_x, rows, columns, full[rows][:, columns],
                                          embedding_model=encoder_id, embedding_revision=revision,
                                          text_format=text_format, oracle=config.oracle,
                                          valuation_model=DEFAULT_MODEL)
    metrics = network.evaluate(pool_x, target_x, full, rows, columns)
    predicted = network.predict(pool_x, target_x)
    unseen_rows, seen = complement(rows, n), set(columns.tolist())
    per_task = {}
    for task in dict.fromkeys(tasks):
        task_columns = torch.tensor([i for i, t in enumerate(tasks) if t == task and i not in seen])
        if len(task_columns) > 1:
            per_task[task] = {"columns": len(task_columns), "column_spearman": column_spearman(
                predicted[unseen_rows][:, task_columns].double(), full[unseen_rows][:, task_columns].double())}
    network.save_pretrained(folder, model_card_kwargs={"license": "other", "training_data": training_data(
        block_sources, Counter(tasks[i] for i in columns.tolist()), len(rows), len(columns), per_task)})
    cost = 1 - (input_seconds(parts, rates, n, m) + rates["pool"]["gradient"] * len(rows)
                + rates["targets"]["gradient"] * len(columns) + fit_seconds) / oracle_all
    return {"folder": str(folder), "input": input_name, "nn_cift_options": library_encoder(input_name),
            "held_out_task": HELD_OUT_TASK, "block_rows": len(rows),
            "block_columns": len(columns), "block_column_tasks": dict(Counter(tasks[i] for i in columns.tolist())),
            "block_sources": dict(block_sources), "metrics": metrics, "q4_per_task": per_task,
            "cost_reduction": cost}


def training_data(sources: Counter, tasks: Counter, rows: int, columns: int, per_task: dict) -> str:
    """The card's "Training data" section: where the block came from, the licences that bind the weights, and the
    per-task figures on unseen rows and targets."""
    pool_lines = "\n".join(f"- {source}: {count} ({SOURCE_LICENCES.get(source, 'licence unknown')})"
                            for source, count in sources.most_common())
    task_lines = "\n".join(f"- {task}: {count} ({TASK_LICENCES[task]})" for task, count in tasks.most_common())
    unseen = ", ".join(f"{task} {figures['column_spearman']:.3f} ({figures['columns']} targets"
                       + (", a task never seen" if task == HELD_OUT_TASK else "") + ")"
                       for task, figures in per_task.items())
    return (f"Exact first-order Influence Distillation values of {rows} pool rows x {columns} target rows, with "
            f"SmolLM2-135M-Instruct warmed up on 5% of a 4,096-row seeded slice of a Tulu-style instruction pool "
            f"(max_length 256). The block's pool rows, by source:\n\n{pool_lines}\n\nIts targets, by task "
            f"({TASK_LICENCES[HELD_OUT_TASK].split(',')[0]} was held out of the fit):\n\n{task_lines}\n\n"
            f"Per-target Spearman on the unseen rows, by task of the unseen targets: {unseen}.\n\n"
            f"The weights hold no text, but they are fitted on "
            f"values computed from these rows; some are CC BY-NC 4.0 or CC BY-SA 3.0, hence the licence \"other\": "
            f"treat the network as non-commercial and share-alike.")


def log_variant(variant: str, result: dict) -> None:
    log(f"  {variant:<44} Q4 Spearman {result['q4_spearman']:.3f}, per-target {result['q4_column_spearman']:.3f}, "
        f"MSE {result['q4_mse']:.4f} (mean baseline {result['q4_mse_mean_baseline']:.4f}), cost reduction "
        f"{result['cost_reduction']:.1%}")


def print_table(report: dict) -> None:
    print(f"\nNN-CIFT, exact-ID oracle, {report['pool_rows']} pool rows x {report['target_rows']} targets, block "
          f"5% of the rows x {report['block_columns']} columns, the library's network settings")
    print(f"{'input':<24}{'Q1':>7}{'Q2':>7}{'Q3':>7}{'Q4':>7}{'per-target':>11}{'Q4 MSE':>9}{'mean-b.':>9}"
          f"{'cost red.':>11}")
    for name, row in report["inputs"].items():
        quadrant = row["spearman"]
        print(f"{name:<24}" + "".join(f"{quadrant.get(q, float('nan')):>7.3f}" for q in ("Q1", "Q2", "Q3", "Q4"))
              + f"{row['q4_column_spearman']:>11.3f}{row['q4_mse']:>9.4f}{row['q4_mse_mean_baseline']:>9.4f}"
              f"{row['cost_reduction']:>11.1%}")
    print(f"goal: {report['goal']}")


if __name__ == "__main__":
    raise SystemExit(main())
