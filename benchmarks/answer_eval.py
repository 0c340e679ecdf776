"""What the downstream benchmark scores: the answer's own tokens, and for multiple choice the likeliest letter.

The library's target_loss scores every label token of the rendered assistant turn, template tokens included (for a
one-letter MMLU answer, 2 of 3 scored tokens are `<|im_end|>` and a newline): it measures the selection's own
objective. A benchmark of whether training helped must score the answer alone.
"""

from __future__ import annotations

import torch
from datasets import Dataset

from hf_influence.formatting import IGNORE_INDEX
from hf_influence.extraction.gradients import per_sample_losses
from hf_influence.model_passes import eval_mode, run_batches


def answer_rows(tokenizer, rows: Dataset, max_length: int) -> list[dict]:
    """Per prompt/completion row: `input_ids` = the chat-templated prompt with its generation prompt, then the
    completion tokenised alone; `labels` = the completion's tokens only. Over-long rows are cut as the library's
    formatting cuts them (prompt_left): prompt tokens from the left, then, if the completion alone does not fit
    after one prompt token, completion tokens from the right.

    Raises:
        ValueError: a completion with no token (names the row).
    """
    formatted = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        if not answer_ids:
            raise ValueError(f"evaluation row {row['id']!r}: its completion has no token")
        answer_ids = answer_ids[:max_length - 1]
        excess = len(prompt_ids) + len(answer_ids) - max_length
        prompt_ids = prompt_ids[max(0, excess):]
        formatted.append({"input_ids": prompt_ids + answer_ids,
                          "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids})
    return formatted


def choice_token_ids(tokenizer, choices: tuple[str, ...]) -> list[int]:
    """The single token of each choice letter, tokenised alone as the completions are."""
    ids = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in choices]
    if any(len(tokens) != 1 for tokens in ids):
        raise ValueError(f"choices {choices} are not one token each: {ids}")
    return [tokens[0] for tokens in ids]


def answer_metrics(model, tokenizer, rows: Dataset, max_length: int, choices: tuple[str, ...] | None = None,
                   batch_size: int = 8) -> dict:
    """`answer_loss`: the mean over rows of each row's mean cross-entropy of its answer tokens (nats per token).
    With `choices` (e.g. ("A", "B", "C", "D")), also `accuracy`: the share of rows whose completion is the choice
    with the largest next-token logit at the answer's first position."""
    formatted = answer_rows(tokenizer, rows, max_length)
    choice_ids = None if choices is None else torch.tensor(choice_token_ids(tokenizer, choices))

    def forward(batch: dict) -> torch.Tensor:
        losses = per_sample_losses(model, batch)[:, None]
        if choice_ids is None:
            return losses
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        first = (batch["labels"] != IGNORE_INDEX).int().argmax(dim=1)  # the answer's first token
        letters = logits[torch.arange(len(first)), first - 1][:, choice_ids.to(logits.device)]
        return torch.cat([losses, letters.argmax(dim=1, keepdim=True).float()], dim=1)

    with eval_mode(model):
        outputs = run_batches(model, tokenizer, formatted, forward, batch_size)
    result = {"answer_loss": float(outputs[:, 0].double().mean())}
    if choice_ids is not None:
        truth = torch.tensor([choices.index(row["completion"].strip()) for row in rows])
        result["accuracy"] = float((outputs[:, 1].long() == truth).double().mean())
    return result
