"""Offline tiny models for tests, examples and benchmarks.

`tiny_causal_lm` builds a randomly initialised Llama- or Qwen2-style causal LM from a config and a
byte-level BPE tokenizer trained in-process (about 0.05 s) with a ChatML chat template. Nothing is read
from disk or the network, so tests run anywhere, and the same seed gives the same model.
"""

from __future__ import annotations

import functools

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .formatting import format_dataset, pad_batch
from .models import LoraSettings, add_lora

# ChatML, the template family of Qwen2 and SmolLM2: prefix-consistent (the tokens of the first i turns
# are a prefix of the tokens of the first i+1 turns), which the response masking in formatting relies on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A small corpus covering the kinds of text the tests format: chat roles, arithmetic, code, prose.
_CORPUS = [
    "user assistant system",
    "What is 12 plus 7? 12 + 7 = 19. The answer is 19.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def add(a, b):\n    return a + b\n",
    "Translate to French: the cat sits on the mat. Le chat est assis sur le tapis.",
    "Question: Which river flows through Paris? Answer: the Seine.",
    "Classify the sentiment of this review: I loved this film. Sentiment: positive",
    "The quick brown fox jumps over the lazy dog 0123456789 ,.;:!?()[]{}<>=+-*/#$%&'\"",
]


@functools.lru_cache(maxsize=4)
def _train_tokenizer(vocab_size: int) -> str:
    """Train a byte-level BPE and return it serialised (cached: training is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer(vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process, with a ChatML template (or none, to test errors).

    Args:
        vocab_size: target vocabulary size, special tokens included.
        chat_template: Jinja chat template, or None for a tokenizer without one.
    """
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_tokenizer(vocab_size)),
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_causal_lm(
    arch: str = "llama",
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    chat_template: str | None = CHATML_TEMPLATE,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny randomly initialised causal LM and its tokenizer, built from config with no downloads.

    Args:
        arch: "llama" (LlamaForCausalLM) or "qwen2" (Qwen2ForCausalLM: biased q/k/v projections).
        seed: initialisation seed; the same seed gives bit-identical weights.
        hidden_size: model width (4 heads, 2 key/value heads, MLP width 2 x hidden_size).
        num_layers: number of decoder blocks.
        dtype: parameter dtype (float64 for finite-difference checks).
        chat_template: passed to `tiny_tokenizer`.

    Returns:
        (model in eval mode, tokenizer).
    """
    tokenizer = tiny_tokenizer(chat_template=chat_template)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    if arch == "llama":
        config, model_class = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, model_class = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}: use 'llama' or 'qwen2'.")
    torch.manual_seed(seed)
    model = model_class(config).to(dtype)
    if arch == "qwen2":
        # Qwen2 initialises attention biases to zero; random biases make the tests see their gradients.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0.0, 0.02)
    model.eval()
    return model, tokenizer


# Uneven lengths on purpose, so that batches carry padding.
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is 12 plus 7?"}, {"role": "assistant", "content": "12 + 7 = 19. The answer is 19."}]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
    {"messages": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Translate to French: the cat sits on the mat."},
        {"role": "assistant", "content": "Le chat est assis sur le tapis."},
    ]},
    {"messages": [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "    return a + b"}]},
    {"messages": [
        {"role": "user", "content": "Which river flows through Paris?"},
        {"role": "assistant", "content": "The Seine."},
        {"role": "user", "content": "And through London?"},
        {"role": "assistant", "content": "The Thames flows through London."},
    ]},
]

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model(arch="llama", target_modules=ATTENTION, seed=0, dtype=torch.float32, **tiny_kwargs):
    """A tiny model with LoRA whose A and B are both random (B = 0 at PEFT init would hide A's gradient)."""
    model, tokenizer = tiny_causal_lm(arch, seed=seed, dtype=dtype, **tiny_kwargs)
    model = add_lora(model, LoraSettings(lora_r=4, lora_alpha=8, lora_target_modules=target_modules, lora_seed=seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.1)
    return model, tokenizer


def formatted_batch(tokenizer, rows=CHAT_ROWS):
    formatted = format_dataset(rows, tokenizer, show_progress=False).dataset
    return formatted, pad_batch(list(formatted), tokenizer.pad_token_id)


def end_distributed_worker() -> None:
    """Ends a torchrun test worker cleanly: every rank waits for the others, then the process group (and gloo's
    threads) is torn down before the interpreter exits. Left to interpreter exit, a rank can abort with
    "terminate called without an active exception" after its work is done, failing the run for no reason."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
