"""LM-pooled embeddings, the representation of the RDS+ baseline (Ivison et al., 2025).

Each formatted row (prompt and response tokens) goes through the causal LM's decoder; the last hidden
state (after the final norm) is pooled with a position-weighted mean, where the t-th real token
(1-based) weighs t and padding weighs 0: later tokens have seen more of the row, so they say more
about it. Rows are then L2-normalised, and pool rows are scored against targets by cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import Tensor, nn
from transformers.utils.logging import tqdm

from .formatting import FormattingConfig, FormattingError, format_dataset, pad_batch
from .extraction.gradients import causal_lm_parts, first_blocks
from .models import base_model


# How a row's hidden states become one vector: RDS+'s position-weighted mean, or the last real token's state.
LM_POOLINGS = ("mean", "last")


def pooled_batch(decoder: nn.Module, batch: dict[str, Tensor], device: torch.device, pooling: str = "mean") -> Tensor:
    """Unit-norm pooled last hidden state of the decoder for a right-padded batch: [B, hidden]. pooling "mean": the
    position-weighted mean; "last": the state at each row's last real token."""
    mask = batch["attention_mask"].to(device)
    hidden = decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False).last_hidden_state
    return pool_hidden_states(hidden, mask, pooling)


def pool_hidden_states(hidden: Tensor, mask: Tensor, pooling: str = "mean") -> Tensor:
    """Unit-norm pooled rows of right-padded hidden states [B, T, h] with attention mask [B, T]: [B, h] float32."""
    if pooling == "last":
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1].float()
    else:
        # Right padding: the running count of real tokens is each real token's 1-based position.
        weights = (mask.cumsum(1) * mask).float()
        pooled = torch.einsum("bt,bth->bh", weights, hidden.float()) / weights.sum(1, keepdim=True)
    return F.normalize(pooled, dim=1)


def lm_pooled_embeddings(
    model: nn.Module,
    formatted: Dataset,
    batch_size: int = 8,
    pad_token_id: int | None = None,
    show_progress: bool = True,
    pooling: str = "mean",
    num_blocks: int | None = None,
) -> Tensor:
    """Position-weighted mean (or last-token state) of the last hidden state of every formatted row, unit L2 norm.

    Args:
        model: a causal LM, possibly PEFT-wrapped (its adapters are used as they are).
        formatted: `format_dataset(...).dataset` (columns input_ids, labels, ...).
        batch_size: rows per forward pass.
        pad_token_id: id written into padding (default 0): right padding is masked and never attended
            by real tokens, so its value does not change the result.
        show_progress: show a progress bar.
        pooling: "mean" (position-weighted) or "last" (the last real token), see LM_POOLINGS.
        num_blocks: run only the first this many decoder blocks, then the final norm (`first_blocks`); None: all.

    Returns:
        float32 [len(formatted), hidden_size] on the CPU, one unit-norm row per formatted row.
    """
    if batch_size < 1 or len(formatted) == 0:
        raise ValueError(f"Need batch_size >= 1 and at least one row, got {batch_size=} and {len(formatted)} rows.")
    decoder, _ = causal_lm_parts(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    embeddings = []
    try:
        with torch.no_grad(), first_blocks(model, num_blocks), tqdm(
                total=len(formatted), desc="LM embeddings", unit="rows", disable=not show_progress) as progress:
            for start in range(0, len(formatted), batch_size):
                rows = list(formatted.select(range(start, min(start + batch_size, len(formatted)))))
                batch = pad_batch(rows, 0 if pad_token_id is None else pad_token_id)
                embeddings.append(pooled_batch(decoder, batch, device, pooling).cpu())
                progress.update(len(rows))
    finally:
        model.train(was_training)
    return torch.cat(embeddings)


def cosine_scores(pool_embeddings: Tensor, target_embeddings: Tensor, chunk_rows: int = 65536) -> Tensor:
    """Cosine similarity of every pool embedding with every target embedding.

    Args:
        pool_embeddings: [n, e]; may stay on the CPU, rows are moved `chunk_rows` at a time to the
            targets' device.
        target_embeddings: [m, e].
        chunk_rows: pool rows normalised and multiplied per step.

    Returns:
        [n, m] in [-1, 1], float32 (or the inputs' wider float type) on target_embeddings' device.
    """
    pool_shape, target_shape = tuple(pool_embeddings.shape), tuple(target_embeddings.shape)
    if len(pool_shape) != 2 or len(target_shape) != 2 or pool_shape[1] != target_shape[1]:
        raise ValueError(
            f"Expected pool [n, e] and target [m, e] embeddings, got {pool_shape} and {target_shape}."
        )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
    dtype = torch.promote_types(torch.promote_types(pool_embeddings.dtype, target_embeddings.dtype), torch.float32)
    target = F.normalize(target_embeddings.to(dtype), dim=1)
    scores = torch.empty(pool_embeddings.shape[0], target.shape[0], dtype=dtype, device=target.device)
    for start in range(0, pool_embeddings.shape[0], chunk_rows):
        chunk = pool_embeddings[start : start + chunk_rows].to(device=target.device, dtype=dtype)
        scores[start : start + chunk.shape[0]] = F.normalize(chunk, dim=1) @ target.T
    return scores


# NN-CIFT's encoder="lm": a network reading these embeddings records this prefix and the model's id.
LM_ENCODER = "lm"
LM_ENCODER_PREFIX = "lm:"
# Its rows are the formatted token sequences (chat template, max_length), not the sentence encoders' text.
LM_TEXT_FORMAT = "formatted_tokens_v1"


def lm_row_embeddings(model: nn.Module, tokenizer, rows, formatting=None, batch_size: int = 8,
                      show_progress: bool = True, pooling: str = "mean", num_blocks: int | None = None) -> Tensor:
    """`lm_pooled_embeddings` of raw rows (chat or prompt/response), with the base model (a PEFT adapter switched
    off): NN-CIFT's `encoder="lm"`, the valuation model's own representation of a row.

    Args:
        model, tokenizer: the causal LM and its tokenizer.
        rows: a Dataset or list of dicts.
        formatting: FormattingConfig (columns, chat template, max_length); every row must keep a response token.
        pooling, num_blocks: as `lm_pooled_embeddings` (NNCIFTConfig.lm_pooling, lm_blocks).

    Returns:
        float32 [len(rows), hidden_size], unit rows, in the order of `rows`.

    Raises:
        FormattingError: a row that formatting skips (no response token): every row needs an embedding.
    """
    formatted = format_dataset(rows, tokenizer, formatting or FormattingConfig(), show_progress=False)
    if formatted.skipped:
        raise FormattingError(f"Rows cannot be embedded by the LM (row: reason): {formatted.skipped}")
    with base_model(model):
        return lm_pooled_embeddings(model, formatted.dataset, batch_size=batch_size,
                                    pad_token_id=tokenizer.pad_token_id, show_progress=show_progress,
                                    pooling=pooling, num_blocks=num_blocks)


def lm_encoder_id(model_id: str, pooling: str = "mean", num_blocks: int | None = None) -> str:
    """The id a network reading the LM's hidden states records: "lm:<model id>" for RDS+'s representation (the whole
    model, mean pooling: what networks made before these options record), else with "#pooling=...,blocks=..."."""
    options = ([f"pooling={pooling}"] if pooling != "mean" else []) + (
        [f"blocks={num_blocks}"] if num_blocks is not None else [])
    return f"{LM_ENCODER_PREFIX}{model_id}" + (f"#{','.join(options)}" if options else "")


def parse_lm_encoder_id(encoder_id: str) -> tuple[str, str, int | None]:
    """(model id, pooling, num_blocks) of an `lm_encoder_id`.

    Raises:
        ValueError: an option this version does not know (the network would read other embeddings)."""
    model_id, _, options = encoder_id[len(LM_ENCODER_PREFIX):].partition("#")
    values = dict(option.split("=", 1) for option in options.split(",") if option)
    unknown = set(values) - {"pooling", "blocks"}
    if unknown or values.get("pooling", "mean") not in LM_POOLINGS:
        raise ValueError(f"{encoder_id!r}: this version reads LM encoders with pooling in {list(LM_POOLINGS)} and "
                         f"blocks; update hf-influence to use this network.")
    return model_id, values.get("pooling", "mean"), None if "blocks" not in values else int(values["blocks"])
