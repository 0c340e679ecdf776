"""Resumable extraction: an interrupted run resumes into a byte-identical store; mismatches are refused."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_influence.testing import CHAT_ROWS, formatted_batch, lora_model
from hf_influence.extraction.extract import extract_gradients, extract_jvp_embeddings, finished_gradients
from hf_influence.formatting import format_dataset
from hf_influence.extraction.gradients import GradientConfig, PerSampleGradients
from hf_influence.extraction.jvp import JVPConfig, JVPEmbedder
from hf_influence.extraction.store import StoreMismatchError, VectorStore

ROWS = CHAT_ROWS * 3  # 15 rows: several batches of 4, the last one short


def crash_on_call(crash_at: int, original):
    """`original` (a method) that raises KeyboardInterrupt on its crash_at-th call: a crash mid-extraction."""
    calls = {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args, **kwargs)

    return crashing


def store_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.suffix == ".npy"}


def test_gradient_store_equals_direct_computation(tmp_path):
    model, tokenizer = lora_model("llama")
    formatted = format_dataset(ROWS, tokenizer).dataset
    config = GradientConfig(projection="countsketch", projection_dim=64, batch_size=4)
    store = extract_gradients(model, formatted, tmp_path / "g", config, show_progress=False)
    assert store.is_complete() and len(store) == 15 and store.dim == 64
    _, batch = formatted_batch(tokenizer, CHAT_ROWS[:4])
    direct = PerSampleGradients(model, config).compute(batch)
    torch.testing.assert_close(torch.from_numpy(store.read(0, 4)), direct)
    assert list(store.row_ids) == list(range(15))


def test_interrupted_gradient_extraction_resumes_byte_identical(tmp_path, monkeypatch):
    model, tokenizer = lora_model("qwen2", "all-linear")
    formatted = format_dataset(ROWS, tokenizer).dataset
    config = GradientConfig(projection="gaussian", projection_dim=48, batch_size=4)
    reference = extract_gradients(model, formatted, tmp_path / "reference", config, show_progress=False)

    original = PerSampleGradients.compute
    monkeypatch.setattr(PerSampleGradients, "compute", crash_on_call(3, original))
    with pytest.raises(KeyboardInterrupt):
        extract_gradients(model, formatted, tmp_path / "resumed", config, show_progress=False)
    monkeypatch.setattr(PerSampleGradients, "compute", original)
    from hf_influence.extraction.store import VectorStore

    partial = VectorStore.open(tmp_path / "resumed")
    assert partial.rows_done == 8 and not partial.is_complete()
    resumed = extract_gradients(model, formatted, tmp_path / "resumed", config, show_progress=False)
    assert resumed.is_complete()
    assert store_bytes(tmp_path / "resumed") == store_bytes(tmp_path / "reference")
    assert reference.manifest["config_hash"] == resumed.manifest["config_hash"]


@pytest.mark.slow
def test_killed_process_resumes_byte_identical(tmp_path):
    """A real SIGKILL in the middle of a run, then a resume in a fresh process."""
    script = textwrap.dedent("""
        import os, sys, signal
        from hf_influence.testing import CHAT_ROWS, lora_model
        from hf_influence.extraction.extract import extract_jvp_embeddings
        from hf_influence.formatting import format_dataset
        from hf_influence.extraction.jvp import JVPConfig, JVPEmbedder
        model, tokenizer = lora_model("llama")
        formatted = format_dataset(CHAT_ROWS * 3, tokenizer).dataset
        if sys.argv[2] == "kill":
            original, calls = JVPEmbedder.embed, []
            def embed(self, batch):
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(self, batch)
            JVPEmbedder.embed = embed
        extract_jvp_embeddings(model, formatted, sys.argv[1], JVPConfig(num_blocks=1, jvp_batch_size=4, jvp_projection_dim=16), show_progress=False)
    """)
    path = tmp_path / "script.py"
    path.write_text(script)
    run = lambda *args: subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True)
    killed = run(str(tmp_path / "store"), "kill")
    assert killed.returncode == -9, killed.stderr
    from hf_influence.extraction.store import VectorStore

    assert VectorStore.open(tmp_path / "store").rows_done == 8
    assert run(str(tmp_path / "store"), "resume").returncode == 0
    assert run(str(tmp_path / "reference"), "whole").returncode == 0
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "reference")


def test_mismatched_store_is_refused(tmp_path):
    model, tokenizer = lora_model("llama")
    formatted = format_dataset(ROWS, tokenizer).dataset
    config = GradientConfig(projection="countsketch", projection_dim=32, batch_size=8)
    extract_gradients(model, formatted, tmp_path / "g", config, show_progress=False)
    with pytest.raises(StoreMismatchError, match="config_hash"):
        extract_gradients(model, formatted, tmp_path / "g", GradientConfig(projection="countsketch", projection_dim=32, projection_seed=1), show_progress=False)
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        extract_gradients(model, formatted.select(range(14)), tmp_path / "g", config, show_progress=False)
    scale = torch.ones(PerSampleGradients(model, config).raw_dim)
    with pytest.raises(StoreMismatchError, match="config_hash"):
        extract_gradients(model, formatted, tmp_path / "g", config, preconditioner=scale, show_progress=False)
    replaced = extract_gradients(model, formatted, tmp_path / "g", config, preconditioner=scale, overwrite=True, show_progress=False)
    assert replaced.manifest["config"]["preconditioner_digest"] is not None
    # The same model id with trained adapter weights (a warm-up, an online round) is another model.
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_B" in name).add_(0.01)
    with pytest.raises(StoreMismatchError, match="config_hash"):
        extract_gradients(model, formatted, tmp_path / "g", config, preconditioner=scale, show_progress=False)
    jvp_config = JVPConfig(num_blocks=1, jvp_projection_dim=16)
    extract_jvp_embeddings(model, formatted, tmp_path / "e", jvp_config, show_progress=False)
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "lora_A" in name).mul_(2.0)
    with pytest.raises(StoreMismatchError, match="config_hash"):
        extract_jvp_embeddings(model, formatted, tmp_path / "e", jvp_config, show_progress=False)


def test_finished_gradients_is_only_a_complete_store_of_the_same_identity(tmp_path, monkeypatch):
    """finished_gradients hands out a store only where extract_gradients would return it as is: complete, and
    made for this model, adapter, data and setting; anything else is None (never computed, never refused)."""
    model, tokenizer = lora_model("llama")
    formatted = format_dataset(ROWS, tokenizer).dataset
    config = GradientConfig(projection="countsketch", projection_dim=32, batch_size=4)
    assert finished_gradients(model, formatted, tmp_path / "g", config) is None  # no store yet
    store = extract_gradients(model, formatted, tmp_path / "g", config, show_progress=False)
    found = finished_gradients(model, formatted, tmp_path / "g", config)
    assert found is not None and np.array_equal(found.read(0, 15), store.read(0, 15))
    scale = torch.full((PerSampleGradients(model, config).raw_dim,), 2.0)
    assert finished_gradients(model, formatted, tmp_path / "g", config, preconditioner=scale) is None
    assert finished_gradients(model, formatted, tmp_path / "g", GradientConfig(projection="countsketch", projection_dim=32, batch_size=4, projection_seed=1)) is None
    assert finished_gradients(model, formatted.select(range(14)), tmp_path / "g", config) is None
    other, _ = lora_model("llama", seed=1)
    assert finished_gradients(other, formatted, tmp_path / "g", config) is None
    monkeypatch.setattr(PerSampleGradients, "compute", crash_on_call(2, PerSampleGradients.compute))
    with pytest.raises(KeyboardInterrupt):
        extract_gradients(model, formatted, tmp_path / "unfinished", config, show_progress=False)
    assert VectorStore.open(tmp_path / "unfinished").rows_done == 4
    assert finished_gradients(model, formatted, tmp_path / "unfinished", config) is None


def test_jvp_store(tmp_path):
    model, tokenizer = lora_model("qwen2")
    formatted = format_dataset(ROWS, tokenizer).dataset
    config = JVPConfig(num_blocks=2, num_tangents=2, jvp_projection_dim=16, jvp_batch_size=4)
    store = extract_jvp_embeddings(model, formatted, tmp_path / "e", config, show_progress=False)
    _, batch = formatted_batch(tokenizer, CHAT_ROWS[:4])
    torch.testing.assert_close(torch.from_numpy(store.read(0, 4)), JVPEmbedder(model, config).embed(batch))
    assert store.manifest["kind"] == "jvp_embeddings"
