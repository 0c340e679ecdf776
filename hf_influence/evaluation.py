"""Target loss: the quantity data selection is meant to lower, measured before and after fine-tuning."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch import nn

from .formatting import FormattingConfig, format_dataset, pad_batch
from .gradients import per_sample_losses


@torch.no_grad()
def target_loss(model: nn.Module, tokenizer, rows: Dataset | list[dict], formatting: FormattingConfig | None = None,
                batch_size: int = 8) -> float:
    """Mean over target rows of each row's mean response-token cross-entropy (nats per token, averaged per row).

    The same per-sample loss the influence scores differentiate (ALGORITHMS.md: l(theta; z)), so a selection that
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
    formatted = format_dataset(rows, tokenizer, formatting or FormattingConfig(show_progress=False))
    if formatted.skipped:
        raise ValueError(f"target rows without a label token cannot be scored (row: reason): {formatted.skipped}")
    device = next(model.parameters()).device
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        losses = []
        for start in range(0, len(formatted.dataset), batch_size):
            batch = pad_batch(list(formatted.dataset.select(range(start, min(start + batch_size,
                                                                             len(formatted.dataset))))), pad_token_id)
            batch = {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "labels")}
            losses.append(per_sample_losses(model, batch).double().cpu())
    finally:
        model.train(was_training)
    return float(torch.cat(losses).mean())
