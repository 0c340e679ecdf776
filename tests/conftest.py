"""Shared test set-up: offline Hub settings before any test module imports the Hub libraries, and fixtures.
The shared helpers (tiny models, chat rows) live in hf_influence.testing."""

import os

# Set before transformers / datasets / huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from hf_influence.testing import tiny_causal_lm  # noqa: E402


@pytest.fixture
def tiny_llama():
    return tiny_causal_lm("llama", seed=0)
