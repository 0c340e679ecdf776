"""Turn instruction rows into `input_ids` / `attention_mask` / `labels` with the prompt masked.

Accepted row formats (detected from the columns):
- chat: a `messages` column of [{"role", "content"}, ...] (Tulu / open-instruct style); every assistant
  turn is a response, everything else is prompt;
- prompt/completion: `prompt` + `completion` columns, as strings or, in TRL's conversational form, as lists of
  {"role", "content"} turns (the completion's assistant turns are the response, the prompt's turns never are);
- prompt/answer: `prompt` + a response column other than `completion`: `solution` when there is one (GSM8K
  rows carry both a worked `solution` and its bare final `answer`, and training on "18" teaches nothing of
  the reasoning), else `answer`; `FormattingConfig.response_column` names any other;
- alpaca: `instruction` (+ optional `input`) and `output`;
- text: a `text` column only (TRL's language-modelling rows): every token is a label, as SFTTrainer trains on
  them, with the tokenizer's special tokens and an end-of-sequence token but no chat template.
Prompt/response rows become a user turn and an assistant turn and go through the tokenizer's chat template
too, so pool and target share one format.

Labels are -100 on prompt tokens and padding. Rows that end with no label token are never passed on to
produce a NaN loss later: they are skipped and reported (`FormattedDataset.skipped`), or refused when
`on_skip="error"`.

Truncation policy (`truncation="prompt_left"`, the default): an over-long row first loses prompt tokens
from the left (its oldest context), never response tokens, then, if still too long, response tokens from
the right. `"drop"` skips over-long rows and `"error"` refuses them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import tqdm

from .errors import HFInfluenceError
from .validation import check_fields
from .verbosity import get_logger

logger = get_logger(__name__)

IGNORE_INDEX = -100
FORMATS = ("chat", "prompt_completion", "prompt_answer", "alpaca", "text")
# Response columns of prompt/response rows when FormattingConfig.response_column is None, first present wins.
RESPONSE_COLUMNS = ("completion", "solution", "answer")


class FormattingError(HFInfluenceError, ValueError):
    """A dataset or row that cannot be formatted; the message names the row, column or option."""


@dataclass
class FormattingConfig:
    """How rows become token ids and labels.

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "row formatting (FormattingConfig)"

    max_length: int = field(
        default=1024,
        metadata={"help": "maximum tokens per row (prompt + response), after the chat template."})
    truncation: Literal["prompt_left", "drop", "error"] = field(
        default="prompt_left",
        metadata={"help": 'policy for over-long rows: "prompt_left" (drop prompt tokens from the left, then '
                          'response tokens from the right), "drop" (skip and report the row) or "error".'})
    response_column: str | None = field(
        default=None,
        metadata={"help": "response column of prompt/response rows; None picks the first of `completion`, "
                          "`solution`, `answer` that the rows have."})
    prompt_column: str = field(default="prompt", metadata={"help": "prompt column of prompt/response rows."})
    text_column: str = field(
        default="text",
        metadata={"help": "column of language-modelling rows (TRL's dataset_text_field): every token is trained "
                          "on; used when the rows have no chat or prompt/response columns."})
    messages_column: str = field(default="messages", metadata={"help": "column holding chat messages."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja template overriding (or supplying) the tokenizer's own."})
    use_chat_template: bool = field(
        default=True,
        metadata={"help": "False formats prompt/response rows as `prompt + response + eos` with no template (chat"
                          " rows always need a template)."})
    on_skip: Literal["report", "error"] = field(
        default="report",
        metadata={"help": '"report" skips rows with no label token left and logs their ids; "error" raises.'})
    # Deprecated: progress is not a formatting option. In a run it is SelectionConfig.show_progress (the flat
    # option show_progress=...); for format_dataset itself, its show_progress argument. Kept as an init-only
    # argument so that FormattingConfig(show_progress=...) still works, with a FutureWarning.
    show_progress: InitVar[bool | None] = None

    def __post_init__(self, show_progress: bool | None) -> None:
        self._show_progress = show_progress
        if show_progress is not None:
            warnings.warn("FormattingConfig(show_progress=...) is deprecated: pass show_progress to format_dataset, "
                          "or to the run (select_by_influence(..., show_progress=...), SelectionConfig).",
                          FutureWarning, stacklevel=3)
        check_fields(self, integers={"max_length": None})
        if self.max_length < 2:
            raise ValueError(f"FormattingConfig.max_length must be >= 2, got {self.max_length}.")
        if self.truncation not in ("prompt_left", "drop", "error"):
            raise ValueError(
                f"FormattingConfig.truncation={self.truncation!r}: use 'prompt_left', 'drop' or 'error'."
            )
        if self.on_skip not in ("report", "error"):
            raise ValueError(f"FormattingConfig.on_skip={self.on_skip!r}: use 'report' or 'error'.")


@dataclass
class FormattedDataset:
    """The result of `format_dataset`.

    Attributes:
        dataset: columns `row_id` (index of the row in the input), `input_ids`, `attention_mask`,
            `labels` (lists of ints) and `num_label_tokens`.
        skipped: {input row index: reason} for rows that produced no training signal.
        format: the detected row format, one of FORMATS.
        truncated: {input row index: what prompt_left truncation cut} for the kept rows it shortened:
            "part_of_prompt", "whole_prompt" (every token before the response) or "response" (the prompt gone and
            response tokens cut from the right too).
    """

    dataset: Dataset
    skipped: dict[int, str] = field(default_factory=dict)
    format: str = "chat"
    truncated: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)


def detect_format(column_names: Iterable[str], config: FormattingConfig | None = None) -> str:
    """Return the row format (one of FORMATS) implied by the columns."""
    config = config or FormattingConfig()
    columns = set(column_names)
    if config.messages_column in columns:
        return "chat"
    if config.prompt_column in columns:
        if config.response_column is not None:
            if config.response_column not in columns:
                raise FormattingError(
                    f"response_column={config.response_column!r} is not a column; columns: {sorted(columns)}."
                )
            return "prompt_completion" if config.response_column == "completion" else "prompt_answer"
        response = next((column for column in RESPONSE_COLUMNS if column in columns), None)
        if response is not None:
            return "prompt_completion" if response == "completion" else "prompt_answer"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if config.text_column in columns:
        return "text"
    raise FormattingError(
        f"Cannot tell the row format from columns {sorted(columns)}: expected a "
        f"{config.messages_column!r} column (chat), {config.prompt_column!r} with one of {list(RESPONSE_COLUMNS)} "
        f"(or FormattingConfig.response_column naming the response column), Alpaca's 'instruction' "
        f"(+ optional 'input') and 'output', or a {config.text_column!r} column (language modelling)."
    )


def response_column(column_names: Iterable[str], config: FormattingConfig | None = None) -> str:
    """The response column of prompt/response rows with these columns: `config.response_column`, else the first
    of RESPONSE_COLUMNS present (`completion` when none is, so that the error names it)."""
    config = config or FormattingConfig()
    columns = set(column_names)
    return config.response_column or next((column for column in RESPONSE_COLUMNS if column in columns), "completion")


def alpaca_prompt(row: dict[str, Any]) -> str:
    """The prompt of an Alpaca row: its instruction, then its input (when non-empty) after a blank line."""
    instruction, extra = str(row.get("instruction") or ""), str(row.get("input") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def _checked_messages(messages: Any, row_id: int, column: str) -> list[dict]:
    """`messages` as a list of {"role", "content"} turns, or a FormattingError naming the row and column."""
    if not isinstance(messages, list) or not messages:
        raise FormattingError(f"Row {row_id}: column {column!r} must be a non-empty list of messages.")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise FormattingError(
                f"Row {row_id}, column {column!r}, message {turn}: each message needs 'role' and 'content' keys, "
                f"got {message!r}.")
    return [{"role": m["role"], "content": m["content"] or ""} for m in messages]


def is_conversational(row: dict[str, Any], row_format: str, config: FormattingConfig) -> bool:
    """Whether a row of `row_format` is TRL's conversational prompt/completion (its prompt a list of turns)."""
    return row_format in ("prompt_completion", "prompt_answer") and isinstance(row.get(config.prompt_column), list)


def row_messages(row: dict[str, Any], row_id: int, row_format: str, config: FormattingConfig,
                 response: str) -> tuple[list[dict], int]:
    """The row as chat turns and the index of the first turn that may be a response (assistant turns before it
    are prompt); `response` is the response column of prompt/response rows."""
    if row_format == "chat":
        if config.messages_column not in row:
            raise FormattingError(f"Row {row_id} has no {config.messages_column!r} field; its keys: {sorted(row)}.")
        return _checked_messages(row[config.messages_column], row_id, config.messages_column), 0
    if row_format == "alpaca":
        return [{"role": "user", "content": alpaca_prompt(row)},
                {"role": "assistant", "content": "" if row.get("output") is None else str(row["output"])}], 1
    for column in (config.prompt_column, response):
        if column not in row:
            raise FormattingError(f"Row {row_id} has no {column!r} field (format {row_format!r}); its keys: {sorted(row)}.")
    prompt, answer = row[config.prompt_column], row[response]
    if isinstance(prompt, list) or isinstance(answer, list):  # TRL's conversational prompt/completion
        if not (isinstance(prompt, list) and isinstance(answer, list)):
            raise FormattingError(
                f"Row {row_id}: {config.prompt_column!r} and {response!r} must both be strings or both lists of "
                f"messages (TRL's conversational prompt/completion), got {type(prompt).__name__} and "
                f"{type(answer).__name__}.")
        prompt_turns = _checked_messages(prompt, row_id, config.prompt_column)
        return prompt_turns + _checked_messages(answer, row_id, response), len(prompt_turns)
    return [
        {"role": "user", "content": "" if prompt is None else str(prompt)},
        {"role": "assistant", "content": "" if answer is None else str(answer)},
    ], 1


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], row_id: int,
                   first_response: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only the assistant turns from `first_response` on.

    Response spans are located in the rendered text (characters), then mapped to tokens through the
    offsets of one tokenisation of the whole text: tokens can merge across a turn boundary (a newline
    followed by indentation, say), so token-level prefixes of partial renders need not line up.
    A token belongs to the response when it starts inside it.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for turn, message in enumerate(messages):
        # An empty response would only teach the end-of-turn tokens: treat it as carrying no label.
        if turn < first_response or message["role"] != "assistant" or not str(message["content"]).strip():
            continue
        prompt = _render(tokenizer, messages[:turn], generation_prompt=True)
        prefix = _render(tokenizer, messages[: turn + 1], generation_prompt=False)
        # Locating responses by prefix lengths is only sound for templates that render a conversation
        # as the concatenation of its turns; refuse the others rather than mislabel tokens.
        if not text.startswith(prefix) or not prefix.startswith(prompt):
            raise FormattingError(
                f"Row {row_id}: the chat template is not prefix-consistent at turn {turn} (rendering the first "
                f"{turn + 1} turns is not a prefix of the whole conversation), so the response tokens cannot be "
                f"located. Pass FormattingConfig.chat_template with a template that renders turns in order."
            )
        spans.append((len(prompt), len(prefix)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(input_ids, encoded["offset_mapping"])
    ]
    return input_ids, labels


def _tokenize_text(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], row_id: int,
                   config: FormattingConfig) -> tuple[list[int], list[int]]:
    """A language-modelling row as SFTTrainer tokenises it: special tokens, the text, end-of-sequence; every
    token a label (the first is never predicted, as in any causal LM loss)."""
    text = row.get(config.text_column)
    if text is not None and not isinstance(text, str):
        raise FormattingError(f"Row {row_id}: column {config.text_column!r} must hold a string, got "
                              f"{type(text).__name__}.")
    if not text or not text.strip():
        return [], []
    input_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not input_ids or input_ids[-1] != tokenizer.eos_token_id):
        input_ids = input_ids + [tokenizer.eos_token_id]
    return input_ids, list(input_ids)


def _tokenize_plain(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"]
    if messages[1]["content"] and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def _truncate(
    input_ids: list[int], labels: list[int], row_id: int, config: FormattingConfig
) -> tuple[list[int], list[int]] | str:
    """Apply the truncation policy; returns the kept ids and labels, or a skip reason."""
    excess = len(input_ids) - config.max_length
    if excess <= 0:
        return input_ids, labels
    if config.truncation == "error":
        raise FormattingError(
            f"Row {row_id} has {len(input_ids)} tokens > max_length={config.max_length}; raise max_length or "
            f"use truncation='prompt_left' or 'drop'."
        )
    if config.truncation == "drop":
        return "too_long"
    first_label = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    cut_left = min(excess, first_label)
    input_ids, labels = input_ids[cut_left:], labels[cut_left:]
    return input_ids[: config.max_length], labels[: config.max_length]


def _truncation_kind(first_label: int, excess: int) -> str:
    """What prompt_left truncation of a row `excess` tokens too long cut, for FormattedDataset.truncated."""
    if excess < first_label:
        return "part_of_prompt"
    return "whole_prompt" if excess == first_label else "response"


def _rows(dataset: Dataset | list[dict]) -> tuple[list[str], Iterable[dict]]:
    if isinstance(dataset, Dataset):
        return dataset.column_names, iter(dataset)
    if isinstance(dataset, list):
        columns = sorted({key for row in dataset for key in row}) if dataset else []
        return columns, iter(dataset)
    raise TypeError(f"Expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}.")


def format_dataset(
    dataset: Dataset | list[dict],
    tokenizer: PreTrainedTokenizerBase,
    config: FormattingConfig | None = None,
    show_progress: bool | None = None,
) -> FormattedDataset:
    """Tokenise rows into `input_ids`, `attention_mask` and `labels` (prompt and padding masked with -100).

    Args:
        dataset: rows in one of the accepted formats (see module docstring).
        tokenizer: the model's tokenizer; needs a chat template unless `config.use_chat_template` is False
            or `config.chat_template` supplies one.
        config: formatting options.
        show_progress: show a progress bar (None: the deprecated FormattingConfig(show_progress=...) if it was
            given, else True).

    Returns:
        FormattedDataset whose rows keep their input index in `row_id`; skipped rows are listed with a reason.

    Raises:
        FormattingError: empty dataset, unknown format, malformed row, missing chat template, or every row
            skipped (and any skip when `config.on_skip == "error"`).
    """
    config = config or FormattingConfig()
    if show_progress is None:
        show_progress = config._show_progress is not False
    columns, rows = _rows(dataset)
    num_rows = len(dataset)
    if num_rows == 0:
        raise FormattingError("The dataset is empty: nothing to format.")
    row_format = detect_format(columns, config)
    if config.chat_template is not None:
        tokenizer = _with_template(tokenizer, config.chat_template)
    use_template = config.use_chat_template
    if use_template and row_format != "text" and not getattr(tokenizer, "chat_template", None):
        raise FormattingError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat "
            f"template. Pass FormattingConfig(chat_template=...) or, for prompt/response rows, "
            f"FormattingConfig(use_chat_template=False) to format them as prompt + response + eos."
        )
    if use_template and row_format != "text" and not getattr(tokenizer, "is_fast", False):
        raise FormattingError(
            f"{type(tokenizer).__name__} is a slow tokenizer: response masking needs character offsets. Load the "
            f"fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    if not use_template and row_format == "chat":
        raise FormattingError("Chat rows need a chat template: set FormattingConfig.use_chat_template=True.")

    output: dict[str, list] = {"row_id": [], "input_ids": [], "attention_mask": [], "labels": [], "num_label_tokens": []}
    skipped: dict[int, str] = {}
    cut: dict[int, str] = {}
    response = response_column(columns, config)
    if config.response_column is None and row_format == "prompt_answer" and {"solution", "answer"} <= set(columns):
        # Changed after 0.5, which trained these rows on the bare `answer`.
        logger.warning("Rows have both 'solution' and 'answer': the worked solution is the response (hf-influence "
                       "0.5 trained on the bare answer; FormattingConfig(response_column='answer') keeps that).")
    for row_id, row in enumerate(tqdm(rows, total=num_rows, desc="Formatting", disable=not show_progress)):
        if row_format == "text":
            input_ids, labels = _tokenize_text(tokenizer, row, row_id, config)
        elif use_template:
            messages, first_response = row_messages(row, row_id, row_format, config, response)
            input_ids, labels = _tokenize_chat(tokenizer, messages, row_id, first_response)
        else:
            if is_conversational(row, row_format, config):
                raise FormattingError(f"Row {row_id}: conversational prompt/completion rows need a chat template: "
                                      f"set FormattingConfig.use_chat_template=True.")
            input_ids, labels = _tokenize_plain(tokenizer, row_messages(row, row_id, row_format, config, response)[0])
        if not any(label != IGNORE_INDEX for label in labels):
            skipped[row_id] = "no_label_tokens"
            continue
        length = len(input_ids)
        first_label = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        truncated = _truncate(input_ids, labels, row_id, config)
        if isinstance(truncated, str):
            skipped[row_id] = truncated
            continue
        input_ids, labels = truncated
        num_labels = sum(label != IGNORE_INDEX for label in labels[1:])  # the first token is never predicted
        if num_labels == 0:
            skipped[row_id] = "truncated_away"
            continue
        if len(input_ids) < length:
            cut[row_id] = _truncation_kind(first_label, length - config.max_length)
        output["row_id"].append(row_id)
        output["input_ids"].append(input_ids)
        output["attention_mask"].append([1] * len(input_ids))
        output["labels"].append(labels)
        output["num_label_tokens"].append(num_labels)

    if skipped:
        examples = ", ".join(f"{row_id} ({reason})" for row_id, reason in list(skipped.items())[:10])
        message = f"{len(skipped)} of {num_rows} rows produce no label token and are skipped: {examples}"
        if config.on_skip == "error" or len(skipped) == num_rows:
            raise FormattingError(
                message + (". Every row was skipped." if len(skipped) == num_rows else ".")
                + " Check for empty responses and raise max_length if rows were truncated away."
            )
        logger.warning(message + ("..." if len(skipped) > 10 else ""))
    if cut:
        counts = {kind: sum(value == kind for value in cut.values()) for kind in ("part_of_prompt", "whole_prompt",
                                                                                 "response")}
        logger.warning("%d of %d rows were longer than max_length=%d and were cut from the left: %d lost part of "
                       "their prompt, %d their whole prompt, %d also response tokens (first: row %d). Raise "
                       "max_length to keep them whole.", len(cut), num_rows, config.max_length,
                       counts["part_of_prompt"], counts["whole_prompt"], counts["response"], next(iter(cut)))
    return FormattedDataset(dataset=Dataset.from_dict(output), skipped=skipped, format=row_format, truncated=cut)


def _with_template(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> PreTrainedTokenizerBase:
    tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = chat_template
    return tokenizer


def pad_batch(
    rows: list[dict[str, list[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad formatted rows into a batch.

    Args:
        rows: dicts with `input_ids` and `labels` (lists of ints of equal length per row).
        pad_token_id: id written into padding positions (they are masked anyway).
        pad_to_multiple_of: round the padded length up to this multiple.

    Returns:
        {"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T], "labels": LongTensor[B, T]} with
        padding masked (attention 0, label -100).
    """
    length = max(len(row["input_ids"]) for row in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
