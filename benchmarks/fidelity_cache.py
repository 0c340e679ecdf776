"""The pool side of the landmark fidelity lab, computed once into a cache folder (see landmark_fidelity.py).

Everything is made with the library's own functions, in the order `select_by_influence` makes it: the
default model with the default LoRA adapter, the seeded warm-up (AdamW on a slice of the pool), then the
Adam-preconditioned per-sample gradients of *every* pool row (exact Influence Distillation; a landmark run
takes its landmark gradients as rows of this store), the target gradients, the JVP embeddings of each JVP
variant, the RDS+ embeddings (base model, adapter off, as `method="rds"` computes them), the proxy-gradient and
hidden-state feature families of the cost-vs-fidelity frontier and the MiniLM sentence embeddings. Each piece is
a resumable store or a safetensors file in the cache: a rerun after a crash resumes, and a finished piece is never
recomputed.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from hf_influence import DEFAULT_MODEL, load_model
from hf_influence.data import load_rows
from hf_influence.rds_embeddings import lm_pooled_embeddings, pooled_batch
from hf_influence.networks.encoders import encode_rows
from hf_influence.extraction.extract import extract_gradients, extract_jvp_embeddings
from hf_influence.formatting import FormattingConfig, format_dataset, pad_batch
from hf_influence.extraction.gradients import GradientConfig, PerSampleGradients, causal_lm_parts, first_blocks
from hf_influence.extraction.jvp import JVPConfig, JVPEmbedder
from hf_influence.models import LoraSettings, add_lora
from hf_influence.optimizers import affine_step
from hf_influence.targets import load_target
from hf_influence.extraction.store import atomic_write_json
from hf_influence.optimizer_warmup import WarmupConfig, warmup

# Target name -> load_target arguments: GSM8K test problems with worked solutions, MMLU dev questions with
# their answer letter, BBH rows with their answer (the loaders' prompt / completion columns).
TARGETS = {"gsm8k": {"task": "gsm8k", "held_out": True}, "mmlu": {"task": "mmlu"}, "bbh": {"task": "bbh"}}
# Gradient representations the lab compares. "lora": the library default (LoRA on attention, Adam-preconditioned
# by the warm-up, CountSketch 8192, unit norm). "down_proj": full-parameter gradients of every MLP down_proj
# (the reference implementation's default module subset), LoGra-projected, plain GD (no Adam state for them).
GRADIENTS = {
    "lora": GradientConfig(),
    "down_proj": GradientConfig(parameters="pattern", parameter_pattern="down_proj", projection="factored",
                                factored_out_dim=16, factored_in_dim=16),
}
# JVP embedding variants: the library default, the paper's reference choice (2 tangents, embedding table
# perturbed too) and the response-token mean.
JVP_VARIANTS = {
    "jvp": JVPConfig(),
    "jvp_reference": JVPConfig(num_tangents=2, perturb_embeddings=True),
    "jvp_response_mean": JVPConfig(jvp_pooling="response_mean"),
    "jvp8": JVPConfig(num_blocks=8),  # (b) through more of the model: 8 of 30 blocks
}
# Cheap gradient features of the cost-vs-fidelity frontier, each cached for the pool and the targets so the lab can
# regress on the vectors or on their inner products with the targets' (a "proxy influence"). SmolLM2-135M has 30
# blocks. Pool rows are preconditioned by the warm-up's Adam state restricted to the tracked LoRA layers.
PROXY_GRADIENTS = {
    # (d) a smaller proxy: the model truncated to its first blocks (then the final norm and the LM head).
    "trunc4": GradientConfig(gradient_blocks=4),
    "trunc8": GradientConfig(gradient_blocks=8),
    # (a) the exact LoRA gradient of the last block only: a full forward, a backward that stops after one block.
    "tail1": GradientConfig(parameter_pattern=r"\.layers\.29\."),
    # (c) LoGra-style low-rank factors (activations x output gradients) of the last two MLP down_proj, projected
    # per layer to 16 x 16: no Adam state for base weights, so plain GD.
    "logra_tail2": GradientConfig(parameters="pattern", parameter_pattern=r"^layers\.(28|29)\.mlp\.down_proj$",
                                  projection="factored", factored_out_dim=16, factored_in_dim=16),
}
# (e) No derivative at all: the base model's hidden state after its first blocks, pooled (adapter off, as RDS+'s
# embeddings; the NN-CIFT benchmark's best input was 8 blocks, last token). Pool rows only, cached as
# NAME_pool.safetensors: a regression feature needs no target side.
LM_STATES = {"lm8_last": {"pooling": "last", "num_blocks": 8}}
# Rows timed side by side, in one process, for the feature costs (seconds per row / a LoRA gradient row's).
COST_ROWS = 48


@dataclass
class LabData:
    pool: Dataset  # the formatted pool rows (row_id into the raw slice)
    sources: list[str]  # source of each formatted pool row
    targets: dict[str, Dataset]  # formatted target rows per target


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_lab_data(data_dir: Path, pool_rows: int, target_rows: int, max_length: int, seed: int, tokenizer):
    """The seeded pool slice and target samples, formatted (max_length tokens, prompts truncated from the left)."""
    raw = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=seed).select(range(pool_rows))
    formatting = FormattingConfig(max_length=max_length)
    pool = format_dataset(raw, tokenizer, formatting, show_progress=False).dataset
    sources = [raw[row]["source"] for row in pool["row_id"]]
    targets = {name: format_dataset(load_target(data_dir=data_dir, limit=target_rows, seed=seed, **spec), tokenizer,
                                    formatting, show_progress=False).dataset for name, spec in TARGETS.items()}
    return LabData(pool, sources, targets)


def _record_seconds(cache: Path, stage: str, seconds: float) -> None:
    """Wall seconds of each cache stage in cache/seconds.json, kept from the run that computed it (a rerun that
    finds the stage done takes ~0 s and does not overwrite it): the speed comparison of exact and landmark ID."""
    path = cache / "seconds.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if seconds > record.get(stage, 0.0):
        record[stage] = seconds
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)


def _saved(path: Path, compute) -> torch.Tensor:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        save_file({"embeddings": compute().contiguous()}, str(tmp))
        tmp.replace(path)
    return load_file(str(path))["embeddings"]


def _rds_embeddings(cache: Path, model, data: LabData, pad: int) -> None:
    """RDS+ embeddings of the pool and targets with the adapter off (method="rds" uses the base model)."""
    with model.disable_adapter():
        _saved(cache / "rds_pool.safetensors", lambda: lm_pooled_embeddings(model, data.pool, pad_token_id=pad,
                                                                            show_progress=False))
        for name, target in data.targets.items():
            _saved(cache / f"rds_target-{name}.safetensors",
                   lambda: lm_pooled_embeddings(model, target, pad_token_id=pad, show_progress=False))


def build_cache(cache: Path, data_dir: Path, pool_rows: int, target_rows: int, max_length: int, seed: int,
                gradients: list[str], jvp_variants: list[str], variant_rows: int | None = None,
                proxies: tuple[str, ...] = (), lm_states: tuple[str, ...] = ()) -> LabData:
    """Compute (or resume) every cached piece; returns the formatted data. Gradient variants other than "lora"
    cover the first `variant_rows` pool rows only when it is given (a cheaper side-by-side comparison).
    `proxies` / `lm_states`: PROXY_GRADIENTS / LM_STATES features to cache; with any, the feature costs are measured
    too (costs.json; features it lacks are measured beside the gradient again, see `_measure_costs`)."""
    cache.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(DEFAULT_MODEL)
    model = add_lora(model, LoraSettings())
    data = load_lab_data(data_dir, pool_rows, target_rows, max_length, seed, tokenizer)
    (cache / "data.json").write_text(json.dumps({"pool_rows": pool_rows, "usable_rows": len(data.pool),
                                                "target_rows": {n: len(t) for n, t in data.targets.items()},
                                                "max_length": max_length, "seed": seed}))
    pad = tokenizer.pad_token_id
    _log("MiniLM sentence embeddings")
    raw = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=seed).select(range(pool_rows)).select(data.pool["row_id"])
    _saved(cache / "minilm_pool.safetensors", lambda: encode_rows(raw, show_progress=False))
    for name, spec in TARGETS.items():
        rows = load_target(data_dir=data_dir, limit=target_rows, seed=seed, **spec).select(data.targets[name]["row_id"])
        _saved(cache / f"minilm_target-{name}.safetensors", lambda: encode_rows(rows, show_progress=False))
    _log("warm-up")
    started = time.perf_counter()
    optimizer = warmup(model, tokenizer, data.pool, WarmupConfig(warmup_show_progress=False),
                       cache_dir=cache / "warmup").optimizer
    _log(f"warm-up done in {time.perf_counter() - started:.0f} s")
    _record_seconds(cache, "warmup", time.perf_counter() - started)
    # The default JVP variant and LoRA gradients first: the lab's main comparison can start while the others run.
    steps = [("jvp", v) for v in jvp_variants[:1]] + [("gradients", g) for g in gradients[:1]] + [("rds", "rds")]
    steps += [("jvp", v) for v in jvp_variants[1:]] + [("gradients", g) for g in gradients[1:]]
    steps += [("proxy", p) for p in proxies] + [("lm_state", name) for name in lm_states]
    for kind, variant in steps:
        started = time.perf_counter()
        if kind == "rds":
            _rds_embeddings(cache, model, data, pad)
        elif kind == "proxy":
            _proxy_gradients(cache, model, optimizer, data, variant, pad)
        elif kind == "lm_state":
            with model.disable_adapter():
                _saved(cache / f"{variant}_pool.safetensors", lambda: lm_pooled_embeddings(
                    model, data.pool, pad_token_id=pad, show_progress=False, **LM_STATES[variant]))
        elif kind == "jvp":
            extract_jvp_embeddings(model, data.pool, cache / variant, JVP_VARIANTS[variant], pad_token_id=pad,
                                   show_progress=False)
        else:
            config = GRADIENTS[variant]
            # Adam preconditioning applies to the parameters the warm-up trained (LoRA); others get plain GD.
            scale = (affine_step(optimizer, PerSampleGradients(model, config).parameters).scale
                     if variant == "lora" else None)
            for name, target in data.targets.items():
                extract_gradients(model, target, cache / f"target_gradients-{variant}-{name}", config,
                                  pad_token_id=pad, show_progress=False)
            rows = data.pool if variant == "lora" or variant_rows is None else data.pool.select(range(variant_rows))
            extract_gradients(model, rows, cache / f"pool_gradients-{variant}", config, preconditioner=scale,
                              pad_token_id=pad, show_progress=False)
        _log(f"{kind} {variant}: {time.perf_counter() - started:.0f} s")
        _record_seconds(cache, f"{kind}/{variant}", time.perf_counter() - started)
    if proxies or lm_states:
        _measure_costs(cache, model, optimizer, data, jvp_variants, proxies, lm_states, pad)
    return data


def _proxy_gradients(cache: Path, model, optimizer, data: LabData, name: str, pad: int) -> None:
    """A PROXY_GRADIENTS feature of every pool row (store cache/name) and of every target row (cache/name_target-t)."""
    config = PROXY_GRADIENTS[name]
    tracked = PerSampleGradients(model, config)
    scale = affine_step(optimizer, tracked.parameters).scale if config.parameters == "lora" else None
    for target_name, target in data.targets.items():
        extract_gradients(model, target, cache / f"{name}_target-{target_name}", config, pad_token_id=pad,
                          show_progress=False)
    extract_gradients(model, data.pool, cache / name, config, preconditioner=scale, pad_token_id=pad,
                      show_progress=False)


def _measure_costs(cache: Path, model, optimizer, data: LabData, jvp_variants: list[str], proxies, lm_states,
                   pad: int) -> None:
    """Seconds per row of every feature and of the exact LoRA gradient, measured side by side in this process on the
    same COST_ROWS pool rows (batches as the extraction makes them, one untimed batch first): cache/costs.json.
    A feature that an existing costs.json lacks is measured in a later run beside the gradient again: its fraction
    joins `fraction_of_gradient`, the run itself is appended to `later_runs`, and the earlier features keep the
    fractions of their own run (a ratio is only comparable within one run, and re-timing them would move the
    library's FEATURE_COSTS with the machine's load)."""
    path = cache / "costs.json"
    earlier = json.loads(path.read_text()) if path.exists() else None
    names = [*jvp_variants, *proxies, "lm", *lm_states]
    if earlier is not None:
        names = [name for name in names if name not in earlier["fraction_of_gradient"]]
        if not names:
            return
    rows = [data.pool[i] for i in range(min(COST_ROWS + 8, len(data.pool)))]
    batches = [pad_batch(rows[start:start + 8], pad) for start in range(0, len(rows), 8)]
    full = PerSampleGradients(model, GRADIENTS["lora"])
    scale = affine_step(optimizer, full.parameters).scale
    decoder, _ = causal_lm_parts(model)

    def lm(batch, pooling="mean", num_blocks=None):  # "lm": the base model's pooled last hidden state, all blocks
        with model.disable_adapter(), torch.no_grad(), first_blocks(model, num_blocks):
            return pooled_batch(decoder, batch, torch.device("cpu"), pooling)

    def cost_function(name: str):
        if name in JVP_VARIANTS:
            return JVPEmbedder(model, JVP_VARIANTS[name]).embed
        if name in PROXY_GRADIENTS:
            return PerSampleGradients(model, PROXY_GRADIENTS[name]).compute
        return functools.partial(lm, **LM_STATES.get(name, {}))
    compute = {"gradient": lambda batch: full.compute(batch, preconditioner=scale),
               **{name: cost_function(name) for name in names}}
    seconds = {}
    model.eval()
    for name, function in compute.items():
        function(batches[0])
        started = time.perf_counter()
        for batch in batches[1:]:
            function(batch)
        seconds[name] = (time.perf_counter() - started) / sum(len(b["input_ids"]) for b in batches[1:])
        _log(f"cost {name}: {seconds[name] * 1000:.0f} ms per row")
    record = {"rows": sum(len(b["input_ids"]) for b in batches[1:]), "seconds_per_row": seconds,
              "fraction_of_gradient": {name: value / seconds["gradient"] for name, value in seconds.items()}}
    if earlier is not None:
        earlier["fraction_of_gradient"].update(record["fraction_of_gradient"])
        earlier["later_runs"] = [*earlier.get("later_runs", []), record]
        record = earlier
    atomic_write_json(path, record)
