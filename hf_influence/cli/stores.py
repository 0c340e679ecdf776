"""`hf-influence gradients` and `hf-influence embed`: per-sample gradients or JVP embeddings of a dataset into a
resumable store."""

from __future__ import annotations

from ..data import load_rows
from ..extraction.extract import extract_gradients, extract_jvp_embeddings
from ..formatting import FormattingConfig, format_dataset
from ..extraction.gradients import GradientConfig
from ..extraction.jvp import JVPConfig
from ..models import LoraSettings, add_lora
from .arguments import DataArguments, ModelArguments, PassArguments, is_main_process, load_cli_model, parse


def formatted_input(data: DataArguments, formatting: FormattingConfig, tokenizer, show_progress: bool):
    if not data.data:
        raise SystemExit("--data is required: a jsonl/json/parquet/csv file, a folder, or a Hub dataset id.")
    rows = load_rows(data.data, split=data.split, limit=data.limit)
    return format_dataset(rows, tokenizer, formatting, show_progress=show_progress)


def run_gradients(argv: list[str]) -> None:
    """Per-sample LoRA gradients of --data into a resumable store under --output."""
    data, passing, model_args, lora, formatting, gradient_config = parse(
        argv, (DataArguments, PassArguments, ModelArguments, LoraSettings, FormattingConfig, GradientConfig),
        "Per-sample LoRA gradients (preconditioned, normalised, projected) into a resumable store.",
        command="gradients",
    )
    model, tokenizer = load_cli_model(model_args)
    formatted = formatted_input(data, formatting, tokenizer, passing.show_progress)
    if gradient_config.parameters == "lora":
        model = add_lora(model, lora)
    store = extract_gradients(model, formatted.dataset, data.output, gradient_config, overwrite=data.overwrite,
                              show_progress=passing.show_progress)
    if is_main_process():
        print(f"{len(store)} rows x {store.dim} gradient store in {data.output} ({len(formatted.skipped)} rows skipped)")


def run_embed(argv: list[str]) -> None:
    """JVP embeddings of --data into a resumable store under --output."""
    data, passing, model_args, formatting, jvp_config = parse(
        argv, (DataArguments, PassArguments, ModelArguments, FormattingConfig, JVPConfig),
        "JVP embeddings (truncated model, random tangents, projected) into a resumable store.",
        command="embed",
    )
    model, tokenizer = load_cli_model(model_args)
    formatted = formatted_input(data, formatting, tokenizer, passing.show_progress)
    store = extract_jvp_embeddings(model, formatted.dataset, data.output, jvp_config, overwrite=data.overwrite,
                                   show_progress=passing.show_progress)
    if is_main_process():
        print(f"{len(store)} rows x {store.dim} JVP embedding store in {data.output} ({len(formatted.skipped)} rows skipped)")
