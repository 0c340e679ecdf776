"""`hf-influence` command line: thin subcommands over the library's config dataclasses.

Each subcommand parses its dataclasses with `transformers.HfArgumentParser`, so every config field is a
flag (`--projection_dim 4096`) and `--config FILE.yaml` supplies defaults that flags override.

    hf-influence demo        extract gradients + JVP embeddings on the embedded default model and data
    hf-influence gradients   per-sample LoRA gradients of a dataset into a resumable store
    hf-influence embed       JVP embeddings of a dataset into a resumable store
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser

from .data import load_rows
from .extract import extract_gradients, extract_jvp_embeddings
from .formatting import FormattingConfig, format_dataset
from .gradients import GradientConfig
from .jvp import JVPConfig
from .models import DEFAULT_MODEL, LoraSettings, add_lora, load_model


@dataclass
class ModelArguments:
    """Which model to load.

    Attributes:
        model: Hub id or local folder of a causal LM (the default falls back to an offline copy).
        revision: Hub revision.
        dtype: "float32", "bfloat16" or "float16".
    """

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local folder of a causal LM."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})


@dataclass
class DataArguments:
    """Input rows and output folder.

    Attributes:
        data: jsonl/json/parquet/csv file (optionally .gz), a folder of them, or a Hub dataset id.
        output: output folder (stores and the summary are written there).
        split: split of a Hub dataset.
        limit: use only the first `limit` rows.
        overwrite: replace stores made with another model, dataset or configuration.
    """

    data: str | None = field(default=None, metadata={"help": "jsonl/json/parquet/csv file, folder, or Hub dataset id."})
    output: str = field(default="runs/hf-influence", metadata={"help": "Output folder."})
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    overwrite: bool = field(default=False, metadata={"help": "Replace mismatched stores instead of refusing them."})


@dataclass
class DemoArguments:
    """The embedded demo data.

    Attributes:
        rows_per_domain: pool rows generated per domain (math, code, qa, classification).
        target_rows: math target rows.
        output: output folder.
        data_seed: data seed.
    """

    rows_per_domain: int = field(default=12, metadata={"help": "Pool rows per demo domain."})
    target_rows: int = field(default=8, metadata={"help": "Rows of the math target."})
    output: str = field(default="runs/demo", metadata={"help": "Output folder."})
    data_seed: int = field(default=0, metadata={"help": "Data seed."})


def _attribute_docs(dataclass_type: type) -> dict[str, str]:
    """{field: text} from the "Attributes:" section of a config dataclass's docstring."""
    docs: dict[str, str] = {}
    lines = inspect.getdoc(dataclass_type).splitlines() if dataclass_type.__doc__ else []
    in_attributes, current = False, None
    for line in lines:
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes:
            continue
        if line and not line.startswith(" "):
            break
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def _parse(argv: list[str], dataclass_types: tuple, description: str) -> tuple:
    parser = HfArgumentParser(dataclass_types, description=description)
    # The config dataclasses document each field in their docstrings: show that text in --help.
    docs = {name: text for dataclass_type in dataclass_types for name, text in _attribute_docs(dataclass_type).items()}
    for action in parser._actions:
        if not action.help and action.dest in docs:
            action.help = docs[action.dest].replace("%", "%%")
    parser.add_argument("--config", default=None, help="YAML file of defaults; flags override it.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**(yaml.safe_load(Path(known.config).read_text()) or {}))
    *parsed, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    # The --config flag comes back as a trailing Namespace after the dataclasses.
    return tuple(parsed[: len(dataclass_types)])


def _load(model_args: ModelArguments):
    dtype = getattr(torch, model_args.dtype)
    return load_model(model_args.model, revision=model_args.revision, dtype=dtype)


def _cosine_to_mean(vectors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of `vectors` [n, d] with the mean of `targets` [m, d]: [n]."""
    centre = targets.mean(0)
    return (vectors @ centre) / (vectors.norm(dim=1) * centre.norm()).clamp_min(1e-12)


def run_demo(argv: list[str]) -> dict:
    """Main job: gradients and JVP embeddings of the demo pool and a math target on the default model."""
    from .demo import demo_pool, demo_target

    demo, model_args, lora, formatting, gradient_config, jvp_config = _parse(
        argv,
        (DemoArguments, ModelArguments, LoraSettings, FormattingConfig, GradientConfig, JVPConfig),
        "Extract per-sample LoRA gradients and JVP embeddings of a generated multi-domain pool and a math "
        "target on the embedded default model, and summarise how each domain aligns with the target.",
    )
    output = Path(demo.output)
    model, tokenizer = _load(model_args)
    pool = demo_pool(demo.rows_per_domain, seed=demo.data_seed)
    target = demo_target("math", demo.target_rows, seed=demo.data_seed + 1)
    formatted_pool = format_dataset(pool, tokenizer, formatting)
    target_formatting = FormattingConfig(**{**asdict(formatting), "response_column": "solution"})
    formatted_target = format_dataset(target, tokenizer, target_formatting)

    started = time.perf_counter()
    embeddings = extract_jvp_embeddings(model, formatted_pool.dataset, output / "pool_jvp", jvp_config)
    target_embeddings = extract_jvp_embeddings(model, formatted_target.dataset, output / "target_jvp", jvp_config)
    jvp_seconds = time.perf_counter() - started
    model = add_lora(model, lora)
    started = time.perf_counter()
    pool_gradients = extract_gradients(model, formatted_pool.dataset, output / "pool_gradients", gradient_config)
    target_gradients = extract_gradients(model, formatted_target.dataset, output / "target_gradients", gradient_config)
    gradient_seconds = time.perf_counter() - started

    gradient_cosine = _cosine_to_mean(pool_gradients.to_tensor(), target_gradients.to_tensor())
    jvp_cosine = _cosine_to_mean(embeddings.to_tensor(), target_embeddings.to_tensor())
    sources = [pool[int(i)]["source"] for i in pool_gradients.row_ids]
    rows = []
    for source in sorted(set(sources)):
        members = torch.tensor([s == source for s in sources])
        rows.append({
            "source": source,
            "rows": int(members.sum()),
            "gradient_cosine_to_target": float(gradient_cosine[members].mean()),
            "jvp_cosine_to_target": float(jvp_cosine[members].mean()),
        })
    total_rows = len(pool_gradients) + len(target_gradients)
    summary = {
        "model": model_args.model,
        "pool_rows": len(pool),
        "target_rows": len(target),
        "skipped_pool_rows": formatted_pool.skipped,
        "gradient_dim": pool_gradients.dim,
        "jvp_dim": embeddings.dim,
        "gradient_rows_per_s": total_rows / gradient_seconds,
        "jvp_rows_per_s": total_rows / jvp_seconds,
        "by_source": rows,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nModel {model_args.model}: {len(pool)} pool rows, {len(target)} math target rows")
    print(f"Gradients: {pool_gradients.dim}-d, {summary['gradient_rows_per_s']:.1f} rows/s;"
          f" JVP embeddings: {embeddings.dim}-d, {summary['jvp_rows_per_s']:.1f} rows/s")
    print(f"\n{'source':<24}{'rows':>6}{'grad cos to target':>22}{'JVP cos to target':>20}")
    for row in sorted(rows, key=lambda r: -r["gradient_cosine_to_target"]):
        print(f"{row['source']:<24}{row['rows']:>6}{row['gradient_cosine_to_target']:>22.4f}{row['jvp_cosine_to_target']:>20.4f}")
    print(f"\nStores and summary.json in {output}/")
    return summary


def _formatted_input(data: DataArguments, formatting: FormattingConfig, tokenizer):
    if not data.data:
        raise SystemExit("--data is required: a jsonl/json/parquet/csv file, a folder, or a Hub dataset id.")
    rows = load_rows(data.data, split=data.split, limit=data.limit)
    return format_dataset(rows, tokenizer, formatting)


def run_gradients(argv: list[str]) -> None:
    """Per-sample LoRA gradients of --data into a resumable store under --output."""
    data, model_args, lora, formatting, gradient_config = _parse(
        argv, (DataArguments, ModelArguments, LoraSettings, FormattingConfig, GradientConfig),
        "Per-sample LoRA gradients (preconditioned, normalised, projected) into a resumable store.",
    )
    model, tokenizer = _load(model_args)
    formatted = _formatted_input(data, formatting, tokenizer)
    if gradient_config.parameters == "lora":
        model = add_lora(model, lora)
    store = extract_gradients(model, formatted.dataset, data.output, gradient_config, overwrite=data.overwrite)
    print(f"{len(store)} rows x {store.dim} gradient store in {data.output} ({len(formatted.skipped)} rows skipped)")


def run_embed(argv: list[str]) -> None:
    """JVP embeddings of --data into a resumable store under --output."""
    data, model_args, formatting, jvp_config = _parse(
        argv, (DataArguments, ModelArguments, FormattingConfig, JVPConfig),
        "JVP embeddings (truncated model, random tangents, projected) into a resumable store.",
    )
    model, tokenizer = _load(model_args)
    formatted = _formatted_input(data, formatting, tokenizer)
    store = extract_jvp_embeddings(model, formatted.dataset, data.output, jvp_config, overwrite=data.overwrite)
    print(f"{len(store)} rows x {store.dim} JVP embedding store in {data.output} ({len(formatted.skipped)} rows skipped)")


COMMANDS = {"demo": run_demo, "gradients": run_gradients, "embed": run_embed}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `hf-influence` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\nRun `hf-influence COMMAND --help` for the options of a command.")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"\nUnknown command {argv[0]!r}: choose from {', '.join(COMMANDS)}.")
        return
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
