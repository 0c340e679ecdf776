"""Warm-up training (TRL SFTTrainer under the hood) and loading a Trainer checkpoint's optimizer state."""

import copy
import functools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_influence.testing import CHAT_ROWS, lora_model

from hf_influence.formatting import IGNORE_INDEX, format_dataset, pad_batch
from hf_influence.extraction.gradients import PerSampleGradients
from hf_influence.optimizers import affine_step
from hf_influence.testing import tiny_causal_lm
from hf_influence.optimizer_warmup import (
    WarmupConfig,
    WarmupMismatchError,
    WarmupResult,
    load_optimizer_state,
    warmup,
    warmup_rows,
)

POOL_ROWS = CHAT_ROWS * 8  # 40 rows


def config(**overrides):
    settings = {"warmup_learning_rate": 1e-3, "warmup_batch_size": 2, "warmup_show_progress": False,
                "warmup_min_steps": 0}
    settings.update(overrides)
    return WarmupConfig(**settings)


def lora_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def base_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


def optimizer_state(optimizer):
    return [
        {key: value.clone() if torch.is_tensor(value) else value for key, value in optimizer.state[p].items()}
        for group in optimizer.param_groups
        for p in group["params"]
    ]


@pytest.fixture(scope="module")
def pool():
    _, tokenizer = lora_model()
    return format_dataset(POOL_ROWS, tokenizer, config=None).dataset


def test_warmup_trains_lora_and_feeds_affine_step():
    model, tokenizer = lora_model()
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    lora_before, base_before = lora_state(model), base_state(model)
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected_random = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)

    result = warmup(model, tokenizer, formatted, config(warmup_fraction=1.0))

    # The caller's random streams are untouched by the trainer's set_seed.
    assert (random.random(), np.random.rand()) == expected_random[:2]
    assert torch.equal(torch.rand(1), expected_random[2])
    assert isinstance(result, WarmupResult)
    assert result.row_ids == [0, 1, 2, 3, 4]
    assert result.steps == 3 == len(result.losses)  # ceil(5 rows / batch 2), one epoch, logged every step
    assert all(np.isfinite(result.losses))
    # LoRA weights moved, the base model did not; eval mode and requires_grad flags are as before.
    assert all(not torch.equal(lora_before[n], p) for n, p in model.named_parameters() if "lora_" in n)
    assert all(torch.equal(base_before[n], p) for n, p in model.named_parameters() if "lora_" not in n)
    assert not model.training and not any(m.training for m in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags_before
    # TRL's fused-LM-head patch of the base model's forward is removed again.
    assert "forward" not in model.get_base_model().__dict__ and "forward" not in model.__dict__

    optimizer = result.optimizer
    assert type(optimizer) is torch.optim.AdamW
    tracked = PerSampleGradients(model).parameters
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in tracked} and len(held) == len(tracked)
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}
    assert all(float(optimizer.state[p]["step"]) == 3 for p in tracked)
    step = affine_step(optimizer, tracked)
    assert step.kind == "adamw" and step.lr == 1e-3
    assert step.scale.shape == step.drift.shape == (sum(p.numel() for p in tracked),)
    assert torch.isfinite(step.scale).all() and torch.isfinite(step.drift).all()
    assert (step.scale > 0).all() and step.drift.abs().sum() > 0


def test_min_steps_cycles_a_small_slice(pool):
    model, tokenizer = lora_model(seed=0)
    result = warmup(model, tokenizer, pool.select(range(5)), config(warmup_fraction=1.0, warmup_min_steps=7))
    assert result.steps == 7 == len(result.losses)  # one epoch would be ceil(5 / 2) = 3 steps
    assert result.row_ids == [0, 1, 2, 3, 4]


def test_slice_size_cap_max_steps_and_accumulation(pool):
    model, tokenizer = lora_model()
    settings = config(
        warmup_fraction=0.25, warmup_max_rows=6, warmup_max_steps=2, warmup_gradient_accumulation_steps=2, warmup_seed=3
    )
    result = warmup(model, tokenizer, pool, settings)
    assert len(result.row_ids) == 6 and result.row_ids == sorted(set(result.row_ids))
    assert set(result.row_ids) <= set(pool["row_id"])
    assert result.steps == 2 == len(result.losses)
    assert all(float(state["step"]) == 2 for state in result.optimizer.state.values())
    # The slice: round(fraction * n), at least one row, capped by warmup_max_rows.
    assert len(warmup_rows(40, WarmupConfig(warmup_fraction=0.25))) == 10
    assert len(warmup_rows(40, WarmupConfig(warmup_fraction=0.001))) == 1
    assert warmup_rows(40, settings) == result.row_ids  # row_id == position here: no row was skipped


def test_same_seed_reproduces_and_other_seed_changes_slice(pool):
    runs = []
    for seed in (0, 0, 1):
        model, tokenizer = lora_model()
        result = warmup(model, tokenizer, pool, config(warmup_fraction=0.1, warmup_max_steps=2, warmup_seed=seed))
        runs.append((result, lora_state(model)))
    (first, first_lora), (second, second_lora), (other, _) = runs
    assert first.row_ids == second.row_ids and first.losses == second.losses
    assert all(torch.equal(first_lora[name], second_lora[name]) for name in first_lora)
    for a, b in zip(optimizer_state(first.optimizer), optimizer_state(second.optimizer)):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    assert other.row_ids != first.row_ids


@pytest.mark.slow
def test_cache_dir_gives_back_the_same_weights_and_state(pool, tmp_path, monkeypatch):
    import importlib

    warmup_module = importlib.import_module("hf_influence.optimizer_warmup")
    settings = config(warmup_fraction=0.1, warmup_max_steps=3)
    trained_model, tokenizer = lora_model()
    trained = warmup(trained_model, tokenizer, pool, settings, cache_dir=tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {"warmup.json", "optimizer.safetensors"}

    def no_training(*args, **kwargs):
        raise AssertionError("the saved warm-up should have been loaded")

    with monkeypatch.context() as patch:
        patch.setattr(warmup_module, "_make_trainer", no_training)
        loaded_model, _ = lora_model()
        loaded = warmup(loaded_model, tokenizer, pool, settings, cache_dir=tmp_path)
    assert (loaded.row_ids, loaded.losses, loaded.steps) == (trained.row_ids, trained.losses, trained.steps)
    trained_lora, loaded_lora = lora_state(trained_model), lora_state(loaded_model)
    assert all(torch.equal(trained_lora[name], loaded_lora[name]) for name in trained_lora)
    for a, b in zip(optimizer_state(trained.optimizer), optimizer_state(loaded.optimizer), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert [{k: v for k, v in group.items() if k != "params"} for group in trained.optimizer.param_groups] == [
        {k: v for k, v in group.items() if k != "params"} for group in loaded.optimizer.param_groups]
    # The loaded optimizer holds the loaded model's own parameters, so affine_step can use it.
    held = {id(p) for group in loaded.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in loaded_model.parameters() if p.requires_grad}

    # Other settings, or other initial adapter weights, are refused before training (the saved warm-up keeps its
    # bytes) unless overwrite=True, which trains again and replaces it; a crash between the two files leaves no
    # manifest, and the next call trains.
    trainings = []
    make_trainer = warmup_module._make_trainer
    monkeypatch.setattr(warmup_module, "_make_trainer", lambda *a, **k: trainings.append(1) or make_trainer(*a, **k))
    other_settings = config(warmup_fraction=0.1, warmup_max_steps=2)
    saved = (tmp_path / "optimizer.safetensors").read_bytes()
    with pytest.raises(WarmupMismatchError, match="differs from this run in: warm-up settings"):
        warmup(lora_model()[0], tokenizer, pool, other_settings, cache_dir=tmp_path)
    assert not trainings and (tmp_path / "optimizer.safetensors").read_bytes() == saved
    warmup(lora_model()[0], tokenizer, pool, other_settings, cache_dir=tmp_path, overwrite=True)
    warmup(lora_model()[0], tokenizer, pool, other_settings, cache_dir=tmp_path)
    assert len(trainings) == 1
    with pytest.raises(WarmupMismatchError, match="differs from this run in: initial adapter weights"):
        warmup(lora_model(seed=1)[0], tokenizer, pool, other_settings, cache_dir=tmp_path)
    warmup(lora_model(seed=1)[0], tokenizer, pool, other_settings, cache_dir=tmp_path, overwrite=True)
    assert len(trainings) == 2
    (tmp_path / "warmup.json").unlink()
    warmup(lora_model(seed=1)[0], tokenizer, pool, other_settings, cache_dir=tmp_path)
    assert len(trainings) == 3


@pytest.mark.parametrize("damage", ["flipped tensor byte", "truncated manifest", "missing tensors"])
def test_a_damaged_saved_warm_up_is_named_before_use_and_overwrite_trains_again(pool, tmp_path, damage, monkeypatch):
    import importlib

    from hf_influence import CorruptWarmupError

    warmup_module = importlib.import_module("hf_influence.optimizer_warmup")
    settings = config(warmup_fraction=0.1, warmup_max_steps=2)
    model, tokenizer = lora_model()
    warmup(model, tokenizer, pool, settings, cache_dir=tmp_path)
    tensors, manifest = tmp_path / "optimizer.safetensors", tmp_path / "warmup.json"
    if damage == "flipped tensor byte":  # a value flipped in the data, the safetensors header still valid
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0xFF
        tensors.write_bytes(bytes(data))
        words = "optimizer.safetensors differs from the SHA-256 recorded when it was saved"
    elif damage == "truncated manifest":
        manifest.write_text(manifest.read_text()[:40])
        words = "warmup.json is not a warm-up manifest"
    else:
        tensors.unlink()
        words = "optimizer.safetensors is missing"
    damaged = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(CorruptWarmupError, match=f"The warm-up saved in .* is damaged: .*{words}.*overwrite=True"):
        warmup(lora_model()[0], tokenizer, pool, settings, cache_dir=tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == damaged  # nothing changed
    trainings = []
    make_trainer = warmup_module._make_trainer
    monkeypatch.setattr(warmup_module, "_make_trainer", lambda *a, **k: trainings.append(1) or make_trainer(*a, **k))
    warmup(lora_model()[0], tokenizer, pool, settings, cache_dir=tmp_path, overwrite=True)
    warmup(lora_model()[0], tokenizer, pool, settings, cache_dir=tmp_path)
    assert trainings == [1]  # trained again once, then loaded


def test_first_step_loss_is_our_response_only_token_mean():
    """The trainer's loss uses our labels exactly: prompt and padding masked, mean over response tokens."""
    model, tokenizer = lora_model()
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    batch = pad_batch(list(formatted), tokenizer.pad_token_id)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    masked = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    all_tokens = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    unmasked = F.cross_entropy(logits.flatten(0, 1), all_tokens.flatten(), ignore_index=IGNORE_INDEX)
    assert (targets == IGNORE_INDEX).sum() > (all_tokens == IGNORE_INDEX).sum()  # the prompt mask matters
    assert abs(masked.item() - unmasked.item()) > 1e-3

    # One batch holding every row, so the first step sees exactly `batch` (row order does not change a token mean).
    result = warmup(model, tokenizer, formatted, config(warmup_fraction=1.0, warmup_batch_size=8, warmup_max_steps=1))
    assert result.steps == 1
    assert result.losses[0] == pytest.approx(masked.item(), rel=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("warmup_fraction", 0.0),
        ("warmup_fraction", 1.5),
        ("warmup_max_rows", 0),
        ("warmup_epochs", 0.0),
        ("warmup_max_steps", 0),
        ("warmup_min_steps", -1),
        ("warmup_learning_rate", -1e-5),
        ("warmup_learning_rate", float("nan")),
        ("warmup_batch_size", 0),
        ("warmup_gradient_accumulation_steps", 0),
        ("warmup_weight_decay", -0.1),
        ("warmup_seed", -1),
        ("warmup_batch_size", 2.5),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"WarmupConfig.{field}"):
        WarmupConfig(**{field: value})


def test_rejects_non_peft_model_and_missing_columns():
    model, tokenizer = lora_model()
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset
    plain, _ = tiny_causal_lm()
    with pytest.raises(ValueError, match="PEFT LoRA model"):
        warmup(plain, tokenizer, formatted, config())
    with pytest.raises(ValueError, match="labels"):
        warmup(model, tokenizer, formatted.remove_columns("labels"), config())


def test_load_optimizer_state_round_trip(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, tokenizer = lora_model()
    formatted = format_dataset(CHAT_ROWS, tokenizer).dataset.select_columns(["input_ids", "labels"])
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        weight_decay=0.01,
        optim="adamw_torch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    collator = functools.partial(pad_batch, pad_token_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=formatted, data_collator=collator)
    trainer.train()
    trained = trainer.optimizer.optimizer
    model.eval()

    optimizer = load_optimizer_state(model, tmp_path / "checkpoint-2")
    assert type(optimizer) is torch.optim.AdamW
    ours = [p for group in optimizer.param_groups for p in group["params"]]
    theirs = [p for group in trained.param_groups for p in group["params"]]
    assert [id(p) for p in ours] == [id(p) for p in theirs]
    for p in theirs:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], trained.state[p][key])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [g["weight_decay"] for g in trained.param_groups]
    assert {g["lr"] for g in optimizer.param_groups} == {g["lr"] for g in trained.param_groups}
    step = affine_step(optimizer, PerSampleGradients(model).parameters)
    assert torch.isfinite(step.scale).all() and torch.isfinite(step.drift).all()

    with pytest.raises(FileNotFoundError, match="checkpoint-2"):
        load_optimizer_state(model, tmp_path)
    other, _ = lora_model(target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="different model"):
        load_optimizer_state(other, tmp_path / "checkpoint-2")
