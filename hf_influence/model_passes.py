"""Batched model passes over formatted rows, and the target loss: what selection is meant to lower."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from datasets import Dataset
from torch import Tensor, nn

from .formatting import FormattingConfig, format_dataset, pad_batch
from .extraction.gradients import per_sample_losses


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """No gradients and the model in eval mode; its training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def run_batches(model: nn.Module, tokenizer, rows: list[dict], forward: Callable[[dict[str, Tensor]], Tensor],
                batch_size: int, progress=None) -> Tensor:
    """Apply `forward` (padded batch on the model's device -> [B, ...]) to `rows` (dicts with input_ids and
    labels) in length-sorted batches; returns float32 [len(rows), ...] in the input order, on the CPU.
    `progress` (a tqdm bar or None) is advanced by the rows of each batch."""
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]["input_ids"]))
    outputs = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = pad_batch([rows[k] for k in indices], pad_token_id)
        outputs.append(forward({key: value.to(device) for key, value in batch.items()}).float().cpu())
        if progress is not None:
            progress.update(len(indices))
    return torch.cat(outputs)[torch.argsort(torch.tensor(order))]


def target_loss(model: nn.Module, tokenizer, rows: Dataset | list[dict], formatting: FormattingConfig | None = None,
                batch_size: int = 8) -> float:
    """Mean over target rows of each row's mean response-token cross-entropy (nats per token, averaged per row).

    The same per-sample loss the influence scores differentiate (docs/algorithms.md, notation: l(theta; z)), so a selection that
    helps should lower it. Runs in eval mode (no dropout) and restores the model's training flag.

    Args:
        model: a causal LM (plain or PEFT).
        tokenizer: its tokenizer (chat template used as in selection).
        rows: target rows (chat `messages` or prompt/response columns).
        formatting: how rows become tokens (max_length, columns); rows formatting cannot use are an error.
        batch_size: rows per forward pass.

    Raises:
        ValueError: a row formatting skipped (no label token left), naming it.
    """
    rows = rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))
    formatted = format_dataset(rows, tokenizer, formatting, show_progress=False)
    if formatted.skipped:
        raise ValueError(f"target rows without a label token cannot be scored (row: reason): {formatted.skipped}")
    with eval_mode(model):
        losses = run_batches(model, tokenizer, list(formatted.dataset), lambda batch: per_sample_losses(model, batch),
                             batch_size)
    return float(losses.double().mean())
