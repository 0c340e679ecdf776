"""Shared test set-up: offline Hub settings, small real-looking rows, tiny LoRA models."""

import os

# Set before transformers / datasets / huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_influence.formatting import format_dataset, pad_batch  # noqa: E402
from hf_influence.models import LoraSettings, add_lora  # noqa: E402
from hf_influence.testing import tiny_causal_lm  # noqa: E402

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
    formatted = format_dataset(rows, tokenizer).dataset
    return formatted, pad_batch(list(formatted), tokenizer.pad_token_id)


@pytest.fixture
def tiny_llama():
    return tiny_causal_lm("llama", seed=0)
