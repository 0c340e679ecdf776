"""Per-sample gradient, JVP embedding and projection throughput, measured side by side.

    python benchmarks/gradients.py --json benchmarks/results/gradients.json [--models tiny,smollm2]

For each model, one batch of real-looking rows (the shared Tulu-style pool when ../shared/data is there,
else the generated demo pool) is timed with:
  (a) hooks      PerSampleGradients.raw: forward hooks + one autograd.grad + one einsum per layer
  (b) loop       one unpadded forward/backward per sample (transformers' own loss)
  (c) vmap       torch.func.vmap(grad(functional_call)) over the padded batch
  (d) train step one plain batched forward + backward of the mean loss (what SFT costs per step)
  jvp            JVPEmbedder.embed (first 4 blocks, 2 tangents) vs forward, a full no-grad forward pass
  projections    countsketch / srht / gaussian of the hooks' gradients to 8192 dimensions
Methods are interleaved over repeats and the median is kept, so the ratios come from the same machine
state. Targets: hooks >= 0.8x train step and >= 3x loop; JVP of 4 of 30 blocks >= 2x forward.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_influence import FormattingConfig, GradientConfig, JVPConfig, JVPEmbedder, PerSampleGradients, format_dataset, pad_batch  # noqa: E402
from hf_influence.demo import demo_pool  # noqa: E402
from hf_influence.models import LoraSettings, add_lora, load_model  # noqa: E402
from hf_influence.extraction.projection import make_projector  # noqa: E402
from hf_influence.testing import tiny_causal_lm  # noqa: E402

SHARED_POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pool.jsonl.gz"


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sample_rows(count: int) -> list[dict]:
    """Real pool rows when available (first rows of several sources), else demo rows."""
    if SHARED_POOL.exists():
        rows, seen = [], {}
        with gzip.open(SHARED_POOL, "rt") as handle:
            for line in handle:
                row = json.loads(line)
                source = row["source"].split("/")[0]
                if seen.get(source, 0) < 2 and len(row["messages"]) == 2:
                    seen[source] = seen.get(source, 0) + 1
                    rows.append({"messages": row["messages"]})
                if len(rows) == count:
                    return rows
    return [{"messages": row["messages"]} for row in demo_pool(count, seed=0).select(range(count))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def vmap_gradients(model, batch, parameters: dict[str, torch.Tensor]):
    """torch.func per-sample gradients of the LoRA parameters over the padded batch."""
    from torch.func import functional_call, grad, vmap

    buffers = dict(model.named_buffers())

    def loss(params, input_ids, labels):
        # No attention mask: the mask builder branches on data, which vmap refuses. With right padding and
        # a causal mask, real tokens never attend to the padding, so the per-sample loss is unchanged.
        outputs = functional_call(model, ({**params}, buffers), args=(),
                                  kwargs={"input_ids": input_ids[None], "labels": labels[None]}, strict=False)
        return outputs.loss

    return vmap(grad(loss), in_dims=(None, 0, 0))(parameters, batch["input_ids"], batch["labels"])


def bench_model(name: str, model, tokenizer, args, device) -> dict:
    rows = sample_rows(args.batch_size)
    formatted = format_dataset(rows, tokenizer, FormattingConfig(max_length=args.max_length), show_progress=False).dataset
    batch = {k: v.to(device) for k, v in pad_batch(list(formatted), tokenizer.pad_token_id).items()}
    tokens = int(batch["attention_mask"].sum())
    peft_model = add_lora(model, LoraSettings(lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    jvp_embedder = JVPEmbedder(peft_model, JVPConfig(num_blocks=min(4, model.config.num_hidden_layers)))
    per_sample = PerSampleGradients(peft_model, GradientConfig(projection="none", normalize=False))
    lora_parameters = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}

    def hooks():
        per_sample.raw(batch)

    def loop():
        for row in formatted:
            out = peft_model(input_ids=torch.tensor([row["input_ids"]], device=device), labels=torch.tensor([row["labels"]], device=device))
            torch.autograd.grad(out.loss, list(lora_parameters.values()))

    def vmap():
        vmap_gradients(peft_model, batch, lora_parameters)

    def train_step():
        peft_model.zero_grad(set_to_none=True)
        peft_model(**batch).loss.backward()

    def jvp():
        jvp_embedder.embed(batch)

    def forward():
        with torch.no_grad():
            peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    methods = {"hooks": hooks, "loop": loop, "vmap": vmap, "train_step": train_step, "jvp": jvp, "forward": forward}
    errors = {}
    for method, function in list(methods.items()):  # warm-up, and drop what cannot run
        try:
            function()
        except Exception as error:  # noqa: BLE001 (a benchmark reports what fails instead of stopping)
            errors[method] = f"{type(error).__name__}: {str(error)[:200]}"
            del methods[method]
    times = {method: [] for method in methods}
    for _ in range(args.repeats):
        for method, function in methods.items():
            times[method].append(timed(function, device))
    result = {"model": name, "batch_size": len(formatted), "tokens": tokens, "lora_dim": per_sample.raw_dim,
              "errors": errors}
    for method, samples in times.items():
        result[f"{method}_seconds"] = statistics.median(samples)
        result[f"{method}_samples_per_s"] = len(formatted) / statistics.median(samples)
    gradients = per_sample.raw(batch).detach()
    for kind in ("countsketch", "srht", "gaussian"):
        matrix_gb = gradients.shape[1] * args.projection_dim * 4 / 1e9
        if kind == "gaussian" and matrix_gb > args.max_gaussian_gb:
            errors["projection_gaussian"] = f"skipped: the dense matrix would be {matrix_gb:.1f} GB (regenerated per call)"
            continue
        projector = make_projector(kind, gradients.shape[1], args.projection_dim, seed=0, **({"max_memory_mb": args.max_gaussian_gb * 1000} if kind == "gaussian" else {}))
        projector.project(gradients)  # builds cached tables
        seconds = statistics.median(timed(lambda: projector.project(gradients), device) for _ in range(args.repeats))
        result[f"projection_{kind}_samples_per_s"] = len(formatted) / seconds
    if "train_step_seconds" in result:
        result["hooks_vs_train_step"] = result["train_step_seconds"] / result["hooks_seconds"]
        result["hooks_vs_loop"] = result.get("loop_seconds", float("nan")) / result["hooks_seconds"]
        result["jvp_vs_forward"] = result.get("forward_seconds", float("nan")) / result.get("jvp_seconds", float("nan"))
    peft_model.unload()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="Where to write the results.")
    parser.add_argument("--models", default="tiny,smollm2", help="Comma-separated: tiny, smollm2, or a Hub id / folder.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--projection-dim", type=int, default=8192)
    parser.add_argument("--max-gaussian-gb", type=float, default=2.0, help="Skip the dense Gaussian above this matrix size.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    results = []
    for name in args.models.split(","):
        if name == "tiny":
            model, tokenizer = tiny_causal_lm("llama", hidden_size=64, num_layers=4)
        else:
            model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct" if name == "smollm2" else name)
        results.append(bench_model(name, model.to(device), tokenizer, args, device))
        del model

    header = ["model", "hooks", "loop", "vmap", "train_step", "jvp", "forward", "hooks/train", "hooks/loop", "jvp/fwd"]
    print("samples/s on", machine()["processor"], f"({args.device}, batch {args.batch_size})")
    print(" | ".join(f"{h:>11}" for h in header))
    for r in results:
        cells = [r["model"]] + [f"{r.get(f'{m}_samples_per_s', float('nan')):.2f}" for m in header[1:7]]
        cells += [f"{r.get(k, float('nan')):.2f}x" for k in ("hooks_vs_train_step", "hooks_vs_loop", "jvp_vs_forward")]
        print(" | ".join(f"{c:>11}" for c in cells))
        for kind in ("countsketch", "srht", "gaussian"):
            if f"projection_{kind}_samples_per_s" in r:
                print(f"    projection {kind:<11} {r[f'projection_{kind}_samples_per_s']:.1f} samples/s (d={r['lora_dim']} -> {args.projection_dim})")
        for method, error in r["errors"].items():
            print(f"    {method} failed: {error}")
    # Headline keys come from the real model when it was run, else from the first model.
    headline = next((r for r in results if r["model"] == "smollm2"), results[0])
    summary = {"machine": machine(), "device": args.device, "results": results}
    for key in ("hooks", "loop", "vmap", "train_step", "jvp", "forward"):
        summary[f"{key}_samples_per_s"] = headline.get(f"{key}_samples_per_s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
