"""Influence oracles behind one interface: the expensive scores that NN-CIFT learns to predict.

Every oracle maps (pool rows, target rows) to a block of scores with one row per pool row and one column per
target row, `[len(pool), len(target)]`; pointwise oracles (a score per pool row, whatever the target) return
`[len(pool), 1]`. Higher means more useful. `identity()` names the oracle, its models and its settings, which is
what a distilled network is only valid for.

- `DeliftSEOracle`: DELIFT-SE (Agarwal et al., 2025), the cosine similarity of the sentence embeddings of the
  pool and target rows' texts (`hf_influence.networks.encoders`).
- `DeliftOracle`: DELIFT's in-context utility. With a valuation LM, for target j with prompt x_j and response y_j,
  u(i, j) = d(y_j | x_j) - d(y_j | example_i, x_j), where d is a distance of the model's predictions from y_j's
  tokens: by default the reference code's ||p - 1||_2 / sqrt(T) over the probabilities p of y_j's T tokens
  ("probability_l2"), or their mean negative log-likelihood ("mean_nll"): u > 0 means showing pool example i in
  context brought the model closer to y_j.
- `MethodOracle`: any scoring method of `select_by_influence` (Influence Distillation first order, exact or
  with landmarks; LESS; RDS+) on the block, with the method's model, warm-up and options.
- `SelectITOracle`: SelectIT's self-reflection score (Liu et al., 2024), pointwise: the LM rates each
  (instruction, response) pair on a 1..K scale under several rating prompts, and the score is read from the
  next-token probabilities of the K rating digits.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from datasets import Dataset
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import tqdm

from .encoders import DEFAULT_ENCODER, TEXT_FORMAT, encode_rows, encoder_identity, load_encoder, prompt_and_response
from ..engine import compute_scores, prepare_model
from ..formatting import IGNORE_INDEX, FormattingConfig, FormattingError, format_dataset
from ..extraction.gradients import causal_lm_parts, response_token_losses
from ..model_passes import eval_mode, run_batches
from ..models import DEFAULT_MODEL, model_identity
from ..optimizer_warmup import WarmupConfig, warmup
from ..options import SelectionConfig, split_options
from ..rds_embeddings import LM_ENCODER, cosine_scores
from ..registry import METHODS, register_oracle
from ..extraction.store import fingerprint_dataset

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Rows = Dataset | list[dict]

# DELIFT's distances between the model's predictions and a response (see DeliftOracle).
DELIFT_DISTANCES = ("probability_l2", "mean_nll")

# Rows handed to the tokenizer at once: bounds the token lists held in memory, and long enough to sort by
# length so that batches carry little padding.
CHUNK_BATCHES = 16


class Oracle(ABC):
    """A source of influence scores for (pool row, target row) pairs.

    Attributes:
        name: short oracle name, e.g. "delift".
        pointwise: True when the score depends on the pool row alone ([len(pool), 1] blocks).
    """

    name: str
    pointwise: bool

    def compute_block(self, pool_rows: Rows, target_rows: Rows | None = None) -> Tensor:
        """Scores of every pool row against every target row.

        Args:
            pool_rows: chat or prompt/response rows (a Dataset or a list of dicts); they give the block's rows.
            target_rows: rows in the same formats, the block's columns; ignored (may be None) by pointwise oracles.

        Returns:
            float32 [len(pool_rows), len(target_rows)] on the CPU, or [len(pool_rows), 1] for pointwise oracles.

        Raises:
            ValueError: empty pool (or target, for pairwise oracles); FormattingError (a ValueError) for a row
            without a response.
        """
        if pool_rows is None or len(pool_rows) == 0:
            raise ValueError(f"{type(self).__name__}.compute_block needs at least one pool row.")
        if not self.pointwise and (target_rows is None or len(target_rows) == 0):
            raise ValueError(f"{type(self).__name__}.compute_block needs at least one target row.")
        return self._compute(pool_rows, target_rows).float().cpu()

    @abstractmethod
    def _compute(self, pool_rows: Rows, target_rows: Rows | None) -> Tensor:
        """The block, [len(pool), len(target)] (or [len(pool), 1]); inputs are non-empty."""

    def prepare(self, pool_rows: Rows) -> None:
        """Called once with the whole pool before any block (nn_cift does): pool-wide state goes here, e.g. the
        warm-up of a method oracle. The default does nothing."""

    def release(self) -> None:
        """Called once after the last block: undoes what `prepare` did to a user's objects."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-able provenance: the oracle's name, pointwise flag, model ids and revisions, and settings."""


class DeliftSEOracle(Oracle):
    """DELIFT-SE: cosine similarity of the sentence embeddings of pool and target row texts (`row_text`).

    Args:
        encoder: a SentenceTransformer or a name for `load_encoder` (default DEFAULT_ENCODER).
        batch_size: rows per encoder call.
        response_column: response column of prompt/response rows (default `completion`, else `answer`).
        show_progress: show progress bars.
    """

    name = "delift_se"
    pointwise = False

    def __init__(
        self,
        encoder: str | SentenceTransformer | None = None,
        batch_size: int = 64,
        response_column: str | None = None,
        show_progress: bool = True,
    ):
        self.encoder = load_encoder(encoder or DEFAULT_ENCODER) if encoder is None or isinstance(encoder, str) else encoder
        self.batch_size = batch_size
        self.response_column = response_column
        self.show_progress = show_progress

    def embed(self, rows: Rows) -> Tensor:
        """Unit sentence embeddings of `rows`: float32 [len(rows), embedding_dim] (see `encode_rows`)."""
        return encode_rows(rows, self.encoder, batch_size=self.batch_size, show_progress=self.show_progress,
                           response_column=self.response_column)

    def _compute(self, pool_rows: Rows, target_rows: Rows) -> Tensor:
        return cosine_scores(self.embed(pool_rows), self.embed(target_rows))

    def identity(self) -> dict[str, Any]:
        encoder_id, revision = encoder_identity(self.encoder)
        return {"name": self.name, "pointwise": self.pointwise, "encoder_id": encoder_id,
                "encoder_revision": revision, "text_format": TEXT_FORMAT, "response_column": self.response_column}


class MethodOracle(Oracle):
    """A registered selection method's scores as an oracle, e.g. Influence Distillation or LESS.

    Args:
        method: a method of `hf_influence.select_by_influence` that scores pairs ("influence_distillation_exact",
            the default: first-order ID with every block row's gradient; "influence_distillation"; "less"; "rds").
        model, tokenizer, optimizer: as for `select_by_influence` (model None: the embedded default).
        **options: fields of the selection config dataclasses (e.g. max_length, projection_dim, warmup_*).
            The warm-up is seeded and the model is restored after each block, so blocks are consistent.
            With `work_dir`, each block keeps its stores in a subfolder named by the block's rows, so a
            training block and an evaluation block never share a store and a rerun resumes each.
    """

    pointwise = False

    def __init__(self, method: str = "influence_distillation_exact", model=None, tokenizer=None,
                 optimizer: torch.optim.Optimizer | None = None, **options: Any):
        scoring = sorted(name for name, spec in METHODS.items() if spec.needs_model)
        if method not in scoring:
            raise ValueError(f"MethodOracle needs a scoring method of {scoring}, got {method!r}")
        self.name, self.model, self.tokenizer, self.optimizer = method, model, tokenizer, optimizer
        self.options = {**options, "method": method}
        self.configs = split_options(dict(self.options))  # validates the options now, not at the first block

    def prepare(self, pool_rows: Rows) -> None:
        """Warm up once on the whole pool, as a full-pool run of the method would (same rows, seed and state), and
        score every block with that optimizer state. Without it each block would warm up on its own rows (5% of
        a block is a handful of rows), so blocks would disagree with each other and with the full run. With a
        work_dir the warm-up is the one a full-pool run keeps there (work_dir/warmup)."""
        selection = self.configs[SelectionConfig]
        if self.optimizer is not None or self.configs[WarmupConfig].optimizer_state == "gd":
            return
        pool = pool_rows if isinstance(pool_rows, Dataset) else Dataset.from_list(list(pool_rows))
        model, tokenizer, restore = prepare_model(self.model, self.tokenizer, self.configs)
        formatted = format_dataset(pool, tokenizer, self.configs[FormattingConfig], show_progress=False)
        cache_dir = None if selection.work_dir is None else Path(selection.work_dir) / "warmup"
        try:
            result = warmup(model, tokenizer, formatted, self.configs[WarmupConfig], cache_dir=cache_dir,
                            overwrite=selection.overwrite)
        except BaseException:
            restore()
            raise
        self._prepared = (self.model, self.tokenizer, self.optimizer, restore)
        self.model, self.tokenizer, self.optimizer = model, tokenizer, result.optimizer

    def release(self) -> None:
        if getattr(self, "_prepared", None) is None:
            return
        self.model, self.tokenizer, self.optimizer, restore = self._prepared
        self._prepared = None
        restore()

    def _compute(self, pool_rows: Rows, target_rows: Rows) -> Tensor:
        pool = pool_rows if isinstance(pool_rows, Dataset) else Dataset.from_list(list(pool_rows))
        target = target_rows if isinstance(target_rows, Dataset) else Dataset.from_list(list(target_rows))
        options = dict(self.options)
        if options.get("work_dir") is not None:
            block = hashlib.sha256(f"{fingerprint_dataset(pool)}:{fingerprint_dataset(target)}".encode()).hexdigest()
            options["work_dir"] = str(Path(options["work_dir"]) / f"block-{block[:16]}")
        run = compute_scores(pool, target, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                             **options)
        if run.skipped:
            raise FormattingError(f"Pool rows cannot be scored by {self.name} (row: reason): {run.skipped}")
        self.last_details = run.details
        return run.output.scores

    def identity(self) -> dict[str, Any]:
        model = self.model or DEFAULT_MODEL
        model = model if isinstance(model, str) else model_identity(model)[0]
        return {"name": self.name, "pointwise": False, "model_id": model,
                "configs": {type(c).__name__: dataclasses.asdict(c) for c in self.configs.values()}}


class _LMOracle(Oracle):
    """Shared plumbing of the oracles that run a causal LM: eval mode, device, batching and progress."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, formatting: FormattingConfig | None,
                 batch_size: int, show_progress: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        self.formatting = formatting or FormattingConfig()
        self.batch_size = batch_size
        self.show_progress = show_progress

    def _model_identity(self) -> dict[str, Any]:
        model_id, revision = model_identity(self.model)
        return {"name": self.name, "pointwise": self.pointwise, "model_id": model_id, "model_revision": revision}

    def _run_batches(self, rows: list[dict], forward, progress) -> Tensor:
        """`run_batches` with this oracle's model, tokenizer and batch size."""
        return run_batches(self.model, self.tokenizer, rows, forward, self.batch_size, progress)


class DeliftOracle(_LMOracle):
    """DELIFT's in-context utility u(i, j) = d(y_j | x_j) - d(y_j | example_i, x_j) with a valuation LM.

    d is computed on target j's response tokens (its last assistant turn, end-of-turn tokens included, as
    labelled by `hf_influence.formatting`), from the probability p_t the model gives each of its T tokens:
    distance="probability_l2" (default, DELIFT's reference code) is ||p - 1||_2 / sqrt(T), in [0, 1];
    distance="mean_nll" is -mean(log p_t), nats per token. The reference code reads p_t at the token's own
    position (an off-by-one: the logits there predict the next token); here p_t is the next-token prediction
    from the tokens before t, as the model is trained. The in-context prompt
    (`pair_messages`) is, in the chat template: the target's system turns, then pool example i as previous turns
    (its prompt and response as a user/assistant exchange; its own system turns are dropped, a conversation has
    one system prompt), then the target's prompt turns. Both d terms use the same response tokens: a row longer
    than `formatting.max_length` loses context tokens from the left (the example first), never response tokens,
    unless the response alone is too long.

    Args:
        model: the valuation causal LM (possibly PEFT-wrapped), in any mode; it runs in eval mode.
        tokenizer: its tokenizer, with a chat template (or `formatting.chat_template`).
        formatting: columns, chat template and max_length; truncation "prompt_left" or "error".
        batch_size: sequences per forward pass.
        show_progress: show a progress bar.
        distance: "probability_l2" or "mean_nll" (see above).
    """

    name = "delift"
    pointwise = False

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 formatting: FormattingConfig | None = None, batch_size: int = 8, show_progress: bool = True,
                 distance: Literal["probability_l2", "mean_nll"] = "probability_l2"):
        super().__init__(model, tokenizer, formatting, batch_size, show_progress)
        if distance not in DELIFT_DISTANCES:
            raise ValueError(f"distance={distance!r}: use one of {list(DELIFT_DISTANCES)}.")
        self.distance = distance
        if not self.formatting.use_chat_template:
            raise ValueError("DeliftOracle puts the in-context example in the chat template: use_chat_template=True.")
        if self.formatting.truncation == "drop":
            raise ValueError("DeliftOracle cannot drop a pair from a dense block: use truncation='prompt_left' or "
                             "'error'.")
        # Truncation is done here, after the labels are reduced to the target's response (format_dataset would
        # also protect the example's response, and cut the target's instead).
        self._pair_formatting = dataclasses.replace(
            self.formatting, max_length=2**62, messages_column="messages", on_skip="error"
        )

    def target_messages(self, target_row: dict) -> list[dict]:
        """The conversation scored for d(y_j | x_j): target j's prompt turns, then its response as the last turn."""
        return self.pair_messages(None, target_row)

    def pair_messages(self, pool_row: dict | None, target_row: dict) -> list[dict]:
        """The conversation scored for d(y_j | example_i, x_j) (pool_row None: no example).

        Returns:
            [*target system turns, *example turns, *target prompt turns, {"role": "assistant", "content": y_j}].
        """
        context, response = prompt_and_response(target_row, self.formatting)
        system = [m for m in context if m["role"] == "system"]
        prompt = [m for m in context if m["role"] != "system"]
        example = []
        if pool_row is not None:
            example_context, example_response = prompt_and_response(pool_row, self.formatting)
            example = [m for m in example_context if m["role"] != "system"]
            example.append({"role": "assistant", "content": example_response})
        return [*system, *example, *prompt, {"role": "assistant", "content": response}]

    def response_distances(self, conversations: Sequence[list[dict]], progress=None) -> Tensor:
        """d(last assistant turn | everything before it) of each conversation: float32 [len(conversations)].

        Args:
            conversations: lists of {"role", "content"} turns ending with a non-empty assistant turn.
            progress: a tqdm bar to advance (default: a new one).
        """
        own_progress = progress is None
        if own_progress:
            progress = tqdm(total=len(conversations), desc="DELIFT", unit="seqs", disable=not self.show_progress)
        chunk = self.batch_size * CHUNK_BATCHES
        distances = []
        with eval_mode(self.model):
            for start in range(0, len(conversations), chunk):
                rows = [{"messages": messages} for messages in conversations[start : start + chunk]]
                formatted = format_dataset(rows, self.tokenizer, self._pair_formatting, show_progress=False).dataset
                tokens = [self._truncate(*_last_response_only(row["input_ids"], row["labels"]))
                          for row in formatted]
                distances.append(self._run_batches(tokens, self._batch_distances, progress))
        if own_progress:
            progress.close()
        return torch.cat(distances)

    def _batch_distances(self, batch: dict[str, Tensor]) -> Tensor:
        """[B] distances of each row's labelled tokens from the model's next-token predictions."""
        token_losses, rows, counts = response_token_losses(self.model, batch)
        # p_t = exp(-loss_t): mean_nll averages the losses, probability_l2 the squared (1 - p_t).
        per_token = token_losses if self.distance == "mean_nll" else (-token_losses).exp().neg().add(1).square()
        sums = torch.zeros(len(counts), dtype=per_token.dtype, device=per_token.device).index_add(0, rows, per_token)
        means = sums / counts
        return means if self.distance == "mean_nll" else means.sqrt()

    def _truncate(self, input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
        excess = len(input_ids) - self.formatting.max_length
        if excess > 0:
            if self.formatting.truncation == "error":
                raise FormattingError(
                    f"A DELIFT sequence has {len(input_ids)} tokens > max_length={self.formatting.max_length}; "
                    f"raise max_length or use truncation='prompt_left'."
                )
            first_label = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
            cut = min(excess, first_label)
            input_ids = input_ids[cut:][: self.formatting.max_length]
            labels = labels[cut:][: self.formatting.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def _compute(self, pool_rows: Rows, target_rows: Rows) -> Tensor:
        pool = _checked_rows(pool_rows, "pool", self.formatting)
        targets = _checked_rows(target_rows, "target", self.formatting)
        n, m = len(pool), len(targets)
        with tqdm(total=m + n * m, desc="DELIFT", unit="seqs", disable=not self.show_progress) as progress:
            base = self.response_distances([self.target_messages(t) for t in targets], progress)
            pairs = _LazyPairs(self, pool, targets)
            with_example = self.response_distances(pairs, progress).view(n, m)
        return base[None, :] - with_example

    def identity(self) -> dict[str, Any]:
        return {**self._model_identity(), "distance": self.distance, "formatting": dataclasses.asdict(
            self.formatting)}


class _LazyPairs(Sequence):
    """The n * m in-context conversations, pair p = (i, j) = divmod(p, m), built when a chunk asks for them."""

    def __init__(self, oracle: DeliftOracle, pool: list[dict], targets: list[dict]):
        self.oracle, self.pool, self.targets = oracle, pool, targets

    def __len__(self) -> int:
        return len(self.pool) * len(self.targets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        i, j = divmod(index, len(self.targets))
        return self.oracle.pair_messages(self.pool[i], self.targets[j])


# Paraphrases of SelectIT's rating prompts (the paper uses K = 5 of them), with the scale as a parameter.
RATING_PROMPTS = (
    "Rate how accurately the response follows the instruction on a scale from 1 to {K}. Reply with the score alone.",
    "Give the response a score from 1 to {K} for its correctness and adherence to the instruction; just the number.",
    "On a scale of 1 to {K}, where {K} is best, how correct and helpful is the response? Output only the score.",
    "Judge the response to the instruction and assign it an integer from 1 to {K} for its quality, nothing else.",
    "Score the response from 1 (poor) to {K} (excellent) by how well it carries out the instruction. One digit.",
)


class SelectITOracle(_LMOracle):
    """SelectIT's uncertainty-aware self-reflection score of each pool row (pointwise: [n, 1]).

    For each rating prompt r (`rating_prompts`, formatted with K), the model reads "r, Instruction: ...,
    Response: ..." (as a user turn of its chat template, or as plain text ending in "The answer is:") and the
    next-token probabilities of the digits 1..K are renormalised to sum to 1 (`rating_probabilities`). Then:

    - aggregation="expected" (default): the expected rating sum_k k * P'_k, averaged over the prompts; in [1, K].
    - aggregation="selectit": the paper's formulas. Token level, per prompt: S_tok = S_base * (1 / (K - 1)) *
      sum_k (P'_{S_base} - P'_k), with S_base = argmax_k P'_k (a confident rating weighs more); sentence level,
      over the prompts: mean(S_tok) / (1 + alpha * std(S_tok)) (population std; the prompts disagreeing weighs
      less); in [0, K]. The paper's model level (averaging over several LMs) is left to the caller.

    An over-long rating text (more than `formatting.max_length` tokens) loses response tokens from the response's
    end, then tokens from its start.

    Args:
        model: the rating causal LM (possibly PEFT-wrapped).
        tokenizer: its tokenizer (a fast one when texts may need truncating).
        num_ratings: K, the top of the rating scale, 2..9 (each rating must be one token).
        rating_prompts: rating instructions with "{K}" placeholders; one per sentence-level variation.
        aggregation: "expected" or "selectit" (see above).
        alpha: SelectIT's sentence-level uncertainty weight (used by aggregation="selectit").
        formatting: columns, chat template use and max_length.
        batch_size: sequences per forward pass.
        show_progress: show a progress bar.
    """

    name = "selectit"
    pointwise = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        num_ratings: int = 5,
        rating_prompts: Sequence[str] = RATING_PROMPTS,
        aggregation: Literal["expected", "selectit"] = "expected",
        alpha: float = 0.2,
        formatting: FormattingConfig | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
    ):
        super().__init__(model, tokenizer, formatting, batch_size, show_progress)
        if not 2 <= num_ratings <= 9:
            raise ValueError(f"num_ratings must be in 2..9 (single-digit ratings), got {num_ratings}.")
        if aggregation not in ("expected", "selectit"):
            raise ValueError(f"aggregation={aggregation!r}: use 'expected' or 'selectit'.")
        if not rating_prompts:
            raise ValueError("Need at least one rating prompt.")
        if self.formatting.use_chat_template and not (self.formatting.chat_template or tokenizer.chat_template):
            raise FormattingError("The tokenizer has no chat template: pass FormattingConfig(chat_template=...) or "
                                  "FormattingConfig(use_chat_template=False) to rate plain text.")
        self.num_ratings = num_ratings
        self.rating_prompts = [prompt.format(K=num_ratings) for prompt in rating_prompts]
        self.aggregation = aggregation
        self.alpha = alpha
        self.digit_ids = _digit_token_ids(tokenizer, num_ratings)

    def rating_text(self, row: dict, rating_prompt: str) -> tuple[str, tuple[int, int]]:
        """The text the model continues with a rating, and the character span [start, end) of the response in it."""
        context, response = prompt_and_response(row, self.formatting)
        if len(context) == 1 and context[0]["role"] == "user":
            instruction = context[0]["content"]
        else:
            instruction = "\n".join(f"{m['role']}: {m['content']}" for m in context)
        head = f"{rating_prompt}\n\nInstruction: {instruction}\n\nResponse: "
        if self.formatting.use_chat_template:
            # The template may add text around the turn; the response is its last occurrence in the rendering.
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": head + response}], tokenize=False,
                                                      add_generation_prompt=True,
                                                      chat_template=self.formatting.chat_template)
            start = text.rfind(response)
            if start < 0:
                # The template rewrote the response: an empty span, so that truncation cuts from the text's start.
                return text, (len(text), len(text))
        else:
            text, start = f"{head}{response}\nThe answer is:\n", len(head)
        return text, (start, start + len(response))

    def rating_probabilities(self, rows: Rows) -> Tensor:
        """Renormalised next-token probabilities of the ratings 1..K: float32 [len(rows), num_prompts, K].

        P'_k = P(k) / sum_l P(l) over the K digit tokens (computed as a softmax of their logits, which is the same).
        """
        rows = _checked_rows(rows, "pool", self.formatting)
        texts = [(row, prompt) for row in rows for prompt in self.rating_prompts]
        chunk = self.batch_size * CHUNK_BATCHES
        probabilities = []
        with (eval_mode(self.model),
              tqdm(total=len(texts), desc="SelectIT", unit="seqs", disable=not self.show_progress) as progress):
            for start in range(0, len(texts), chunk):
                tokens = [self._tokenize(*self.rating_text(row, prompt)) for row, prompt in texts[start : start + chunk]]
                probabilities.append(self._run_batches(tokens, self._digit_probabilities, progress))
        return torch.cat(probabilities).view(len(rows), len(self.rating_prompts), self.num_ratings)

    def _tokenize(self, text: str, response_span: tuple[int, int]) -> dict[str, list[int]]:
        # A chat rendering carries the template's own special tokens.
        add_special = not self.formatting.use_chat_template
        input_ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        excess = len(input_ids) - self.formatting.max_length
        if excess > 0:
            if self.formatting.truncation == "error":
                raise FormattingError(f"A SelectIT rating text has {len(input_ids)} tokens > "
                                      f"max_length={self.formatting.max_length}.")
            offsets = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)[
                "offset_mapping"]
            start, end = response_span
            in_response = [k for k, (first, _) in enumerate(offsets) if start <= first < end]
            dropped = set(in_response[len(in_response) - min(excess, len(in_response)):])
            input_ids = [token for k, token in enumerate(input_ids) if k not in dropped]
            input_ids = input_ids[len(input_ids) - self.formatting.max_length:]
        # The labels are unused (the score is read at the last position), pad_batch wants them.
        return {"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(input_ids)}

    def _digit_probabilities(self, batch: dict[str, Tensor]) -> Tensor:
        """[B, K] renormalised probabilities of the rating digits as the token after each row's last token."""
        decoder, lm_head = causal_lm_parts(self.model)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
        # Right padding: a row's last real token sits at its length - 1; the LM head runs there only.
        last = batch["attention_mask"].sum(1) - 1
        logits = lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        return torch.softmax(logits[:, self.digit_ids].float(), dim=-1)

    def scores_from_probabilities(self, probabilities: Tensor) -> Tensor:
        """Aggregate [n, num_prompts, K] rating probabilities into scores [n, 1] (see the class docstring)."""
        ratings = torch.arange(1, self.num_ratings + 1, dtype=probabilities.dtype, device=probabilities.device)
        if self.aggregation == "expected":
            return (probabilities * ratings).sum(-1).mean(-1, keepdim=True)
        top, best = probabilities.max(-1)
        token_level = (best + 1).to(probabilities.dtype) * (top[..., None] - probabilities).sum(-1) / (
            self.num_ratings - 1)
        mean, std = token_level.mean(-1), token_level.std(-1, correction=0)
        return (mean / (1 + self.alpha * std))[:, None]

    def _compute(self, pool_rows: Rows, target_rows: Rows | None) -> Tensor:
        return self.scores_from_probabilities(self.rating_probabilities(pool_rows))

    def identity(self) -> dict[str, Any]:
        return {**self._model_identity(), "num_ratings": self.num_ratings, "rating_prompts": self.rating_prompts,
                "aggregation": self.aggregation, "alpha": self.alpha, "formatting": dataclasses.asdict(
                    self.formatting)}


# ---- the registered oracles: NNCIFTConfig.oracle names one; its factory builds it for a run -----------------


@register_oracle("delift_se", selection="facility_location",
                 needs_model=lambda config: config.encoder == LM_ENCODER)  # the network's input needs the LM
def _delift_se(config, model, tokenizer, optimizer, show_progress: bool, **options) -> Oracle:
    # DELIFT-SE is a sentence encoder's cosine: with encoder="lm" (the network's input) it keeps the default one.
    return DeliftSEOracle(encoder=None if config.encoder == LM_ENCODER else config.encoder,
                          batch_size=config.encoder_batch_size, show_progress=show_progress)


def _valuation_model_oracle(oracle_class: type[_LMOracle]):
    def factory(config, model, tokenizer, optimizer, show_progress: bool, **options) -> Oracle:
        if model is None or isinstance(model, str) or tokenizer is None:
            raise ValueError(f"oracle={config.oracle!r} needs a loaded valuation model and its tokenizer.")
        return oracle_class(model, tokenizer, show_progress=show_progress)

    return factory


register_oracle("delift", selection="facility_location")(_valuation_model_oracle(DeliftOracle))
register_oracle("selectit", selection="mean_top_k")(_valuation_model_oracle(SelectITOracle))


def _method_oracle(config, model, tokenizer, optimizer, show_progress: bool, **options) -> Oracle:
    return MethodOracle(config.oracle, model=model, tokenizer=tokenizer, optimizer=optimizer,
                        show_progress=show_progress, **options)


# Influence Distillation's paper and RDS+ go round-robin over the target rows; LESS takes the top rows by its
# max-over-tasks score.
for _name, _rule in (("influence_distillation_exact", "round_robin"), ("influence_distillation", "round_robin"),
                     ("less", "less"), ("rds", "round_robin")):
    register_oracle(_name, selection=_rule)(_method_oracle)


def _checked_rows(rows: Rows, side: str, config: FormattingConfig) -> list[dict]:
    """The rows as a list, each checked to have a response (FormattingError naming the side and index)."""
    rows = list(rows)
    for index, row in enumerate(rows):
        try:
            prompt_and_response(row, config)
        except FormattingError as error:
            raise FormattingError(f"{side.capitalize()} row {index}: {error}") from error
    return rows


def _last_response_only(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Keep the labels of the last labelled run (the final assistant turn); earlier turns become context."""
    end = max(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids, [IGNORE_INDEX] * start + labels[start:]


def _digit_token_ids(tokenizer: PreTrainedTokenizerBase, num_ratings: int) -> list[int]:
    """Token id of each rating 1..K as it follows a newline (how both rating formats end)."""
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids = []
    for rating in range(1, num_ratings + 1):
        tokens = tokenizer(f"\n{rating}", add_special_tokens=False)["input_ids"]
        if tokens[: len(newline)] != newline or len(tokens) != len(newline) + 1:
            raise ValueError(f"The rating {rating} is not one token after a newline for this tokenizer "
                             f"({tokens} vs {newline}); SelectIT reads single-token ratings.")
        ids.append(tokens[-1])
    return ids

