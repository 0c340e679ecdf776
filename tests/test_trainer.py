"""InfluenceSFTTrainer on tiny models: the weighted loss against a per-sample loop, unit weights against plain
SFTTrainer, the rows the training loop sees, online re-selection steps, score-table (folder, object, Hub) and
PEFT sources, a two-process torchrun run, errors. Run as a script, this file is that run's worker."""

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import hub_server
import pytest
import torch
import torch.nn.functional as F
from hf_influence.testing import CHAT_ROWS
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser, TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_influence import ScoreTable, SelectionError, select_by_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.formatting import IGNORE_INDEX, format_dataset
from hf_influence.artifacts.hub import push_score_table
from hf_influence.engine import compute_scores
from hf_influence.artifacts.scores import provenance_record
from hf_influence.testing import end_distributed_worker, tiny_causal_lm
from hf_influence.trainer import InfluenceSFTTrainer
from hf_influence.trainer_config import InfluenceSFTConfig

# Small and quiet selection options (1 JVP block, a 2-step warm-up, small projections).
FAST = {"num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "projection_dim": 256,
        "jvp_projection_dim": 128}
# Eight rows whose label counts differ, so micro-batches of a step carry different numbers of label tokens.
LOSS_ROWS = CHAT_ROWS + CHAT_ROWS[:3]
RAW_WEIGHTS = [1.0, 2.0, 0.5, 0.0, 3.0, 1.5, 0.25, 4.0]
local_hub = hub_server.local_hub
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def settings(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "out"), "report_to": "none", "use_cpu": True, "bf16": False,
              "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1, "activation_checkpointing": False,
              "max_length": None, "per_device_train_batch_size": 2}
    values.update(overrides)
    return values


def config(tmp_path, **overrides):
    return InfluenceSFTConfig(**settings(tmp_path, **overrides))


def loss_rows(tokenizer, weights=None):
    rows = format_dataset(LOSS_ROWS, tokenizer).dataset.remove_columns(["num_label_tokens", "attention_mask"])
    return rows if weights is None else rows.add_column("weight", weights)


class Recording(InfluenceSFTTrainer):
    """Records (optimizer steps taken, row ids of the micro-batch) for every micro-batch the loop trains on."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.influence_row_id_column in inputs:  # not in packed batches
            self.__dict__.setdefault("seen", []).append(
                (self.state.global_step, inputs[self.args.influence_row_id_column].tolist()))
        return super().training_step(model, inputs, num_items_in_batch)

    def rows_of_steps(self, steps):
        return [row for step, rows in self.seen if step in steps for row in rows]


class GradientRecorder(TrainerCallback):
    """The gradients of every parameter just before each optimizer step."""

    def __init__(self):
        self.gradients = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients.append({name: p.grad.detach().clone() for name, p in model.named_parameters()
                               if p.grad is not None})


def per_sample_losses(model, rows):
    """[(mean token cross-entropy, label-token count)] of each row, one unpadded forward per row."""
    losses = []
    for row in rows:
        input_ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
        logits = model(input_ids=input_ids).logits[0, :-1]
        mask = labels != IGNORE_INDEX
        losses.append((F.cross_entropy(logits[mask], labels[mask]), int(mask.sum())))
    return losses


def reference(model, pool, step_rows, normalization):
    """The step's weighted loss and its gradients, from a plain loop over the step's samples."""
    weights = torch.tensor(pool["weight"], dtype=torch.float64)
    weights = (weights * len(weights) / weights.sum()).float()  # mean 1 over the training rows
    model.zero_grad()
    losses = per_sample_losses(model, [pool[row] for row in step_rows])
    if normalization == "sample":
        loss = sum(weights[row] * loss for row, (loss, _) in zip(step_rows, losses)) / len(step_rows)
    else:
        total = sum(weights[row] * loss * count for row, (loss, count) in zip(step_rows, losses))
        loss = total / sum(count for _, count in losses)
    loss.backward()
    return float(loss.detach()), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("normalization", ["sample", "token"])
@pytest.mark.parametrize(("batch_size", "accumulation"), [(4, 1), (2, 2), (1, 4)])
def test_weighted_loss_equals_a_per_sample_reference_for_any_micro_batch_split(tmp_path, normalization, batch_size,
                                                                              accumulation):
    model, tokenizer = tiny_causal_lm(seed=0)
    reference_model = copy.deepcopy(model)
    pool = loss_rows(tokenizer, RAW_WEIGHTS)
    recorder = GradientRecorder()
    args = config(tmp_path, influence_mode="weight", influence_loss_normalization=normalization, max_steps=1,
                  per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
    trainer = Recording(model, args=args, train_dataset=pool, processing_class=tokenizer, callbacks=[recorder])
    trainer.train()

    step_rows = trainer.rows_of_steps({0})
    assert len(step_rows) == 4 and len(trainer.seen) == accumulation
    expected_loss, expected_gradients = reference(reference_model, pool, step_rows, normalization)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    (gradients,) = recorder.gradients
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-4, atol=1e-7, msg=name)


def test_unit_weights_reproduce_plain_sft_loss_and_gradients_with_accumulation(tmp_path):
    model, tokenizer = tiny_causal_lm(seed=0)
    plain_model = copy.deepcopy(model)
    pool = loss_rows(tokenizer, [1.0] * len(LOSS_ROWS))
    common = {"max_steps": 2, "gradient_accumulation_steps": 2, "max_grad_norm": 0.0, "optim": "sgd",
              "learning_rate": 0.5, "train_sampling_strategy": "sequential"}
    recorder, plain_recorder = GradientRecorder(), GradientRecorder()
    trainer = Recording(model, args=config(tmp_path, influence_mode="weight", influence_loss_normalization="token",
                                           **common), train_dataset=pool, processing_class=tokenizer,
                        callbacks=[recorder])
    trainer.train()
    plain = SFTTrainer(plain_model, args=SFTConfig(**settings(tmp_path, **common)),
                       train_dataset=pool.select_columns(["input_ids", "labels"]), processing_class=tokenizer,
                       callbacks=[plain_recorder])
    plain.train()

    # The premise: the two micro-batches of each step carry different numbers of label tokens.
    label_counts = [sum(sum(label != IGNORE_INDEX for label in pool[row]["labels"][1:]) for row in rows)
                    for _, rows in trainer.seen]
    assert label_counts[0] != label_counts[1] and label_counts[2] != label_counts[3]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses == [entry["loss"] for entry in plain.state.log_history if "loss" in entry]
    for ours, theirs in zip(recorder.gradients, plain_recorder.gradients, strict=True):
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    for (name, parameter), other in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(parameter, other), name
    # The same rows under "sample" normalisation are a different objective: the check above can tell them apart.
    step_rows = trainer.rows_of_steps({0})
    sample_loss, _ = reference(copy.deepcopy(tiny_causal_lm(seed=0)[0]), pool, step_rows, "sample")
    assert not math.isclose(sample_loss, losses[0], rel_tol=1e-3)


@pytest.fixture(scope="module")
def pool():
    return demo_pool(4, seed=0)  # 16 chat rows, 4 domains


@pytest.fixture(scope="module")
def target():
    return demo_target("math", 2, seed=1)


def score_table(num_rows, weights=None):
    scores = torch.randn(num_rows, 2, generator=torch.Generator().manual_seed(3))
    return ScoreTable.from_matrix(scores, list(range(num_rows)), ["t0", "t1"], weights=weights,
                                  provenance=provenance_record(method="influence_distillation", model_id="tiny")), scores


@pytest.mark.parametrize("packing", [False, True])
def test_select_from_a_score_table_folder_trains_on_exactly_the_selected_rows(tmp_path, pool, packing):
    model, tokenizer = tiny_causal_lm(seed=0)
    table, scores = score_table(len(pool))
    table.save(tmp_path / "scores")
    expected = torch.argsort(scores.mean(dim=1), descending=True)[:6].tolist()
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    args = config(tmp_path, influence_score_table=str(tmp_path / "scores"), influence_budget=6,
                  influence_options={"selection": "mean_top_k"}, num_train_epochs=1, packing=packing,
                  max_length=64 if packing else None)
    trainer = Recording(model, args=args, train_dataset=pool, processing_class=tokenizer)
    assert forwards == []  # no model pass: the scores come from the table
    assert trainer.influence_selections[0].row_ids == expected
    trainer.train()

    if packing:  # exactly what SFTTrainer prepares from pool.select(selected)
        plain = SFTTrainer(tiny_causal_lm(seed=0)[0], args=SFTConfig(**settings(tmp_path, packing=True, max_length=64)),
                           train_dataset=pool.select(expected), processing_class=tokenizer)
        assert trainer.train_dataset["input_ids"] == plain.train_dataset["input_ids"]
        assert "seen" not in trainer.__dict__  # packed rows carry no row id
    else:
        assert sorted(trainer.rows_of_steps(range(10))) == sorted(expected)  # each selected row once, no other
    logged = trainer.state.log_history[0]
    assert logged["influence/budget"] == 6 and logged["influence/selected_rows"] == 6
    assert logged["influence/score_q50"] == pytest.approx(float(scores.mean(dim=1).quantile(0.5)), rel=1e-5)
    assert logged["influence/score_mean_selected"] == pytest.approx(float(scores.mean(dim=1)[expected].mean()))

    trainer.create_model_card()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "hf_influence" in card.data.tags
    assert card.data.hf_influence["method"] == "influence_distillation"
    assert "2505.19051" in card.text and "nikdan2025influence" in card.text  # the paper, as TRL cites it
    assert card.data.hf_influence["budget"] == 6 and card.data.hf_influence["source"] == "score_table"
    assert '"model_id": "tiny"' in card.text
    assert 'model="None"' not in card.text and f'model="{tmp_path / "out"}"' in card.text  # TRL's snippet runs


def test_select_from_the_target_uses_the_trainers_model_and_restores_its_adapter(tmp_path, pool, target):
    base, tokenizer = tiny_causal_lm(seed=0)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(**LORA, init_lora_weights=False))  # random A and B
    expected = select_by_influence(pool, target, model=copy.deepcopy(model), tokenizer=tokenizer, budget=4,
                                   selection_seed=7, return_scores=True, show_progress=False,
                                   warmup_show_progress=False, **FAST)[1].provenance["selected_pool_row_ids"]
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    args = config(tmp_path, influence_budget=4, influence_options=FAST, seed=7, max_steps=1)
    trainer = Recording(model, args=args, train_dataset=pool, target_dataset=target, processing_class=tokenizer)

    assert trainer.influence_selections[0].row_ids == expected
    assert all(torch.equal(p, adapter[name]) for name, p in model.named_parameters() if "lora_" in name)
    assert trainer.influence_selections[0].provenance["method"] == "influence_distillation"
    trainer.train()
    assert set(trainer.rows_of_steps({0})) <= set(expected)


def test_peft_config_select_trains_the_adapter_only(tmp_path, pool, target):
    model, tokenizer = tiny_causal_lm(seed=0)
    expected = select_by_influence(pool, target, model=tiny_causal_lm(seed=0)[0], tokenizer=tokenizer, budget=4,
                                   method="rds", selection_seed=42, show_progress=False,
                                   return_scores=True)[1].provenance["selected_pool_row_ids"]
    args = config(tmp_path, influence_budget=4, influence_method="rds", max_steps=2, learning_rate=1e-2)
    trainer = Recording(model, args=args, train_dataset=pool, target_dataset=target, processing_class=tokenizer,
                        peft_config=LoraConfig(**LORA))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    assert trainer.influence_selections[0].row_ids == expected
    assert sorted(trainer.rows_of_steps({0, 1})) == sorted(expected)
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name, p in after.items() if p.requires_grad}  # A moves once B is nonzero (step 2)
    assert changed and all("lora_" in name for name in changed)


def test_selection_with_a_base_model_leaves_every_weight_trainable(tmp_path, pool, target):
    model, tokenizer = tiny_causal_lm(seed=0)
    args = config(tmp_path, influence_budget=4, influence_method="rds", max_steps=1, learning_rate=1e-2)
    trainer = InfluenceSFTTrainer(model, args=args, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer)
    assert all(p.requires_grad for p in trainer.model.parameters())  # the selection's LoRA adapter is gone
    assert not any("lora_" in name for name, _ in trainer.model.named_parameters())
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           trainer.model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize(("dtype", "bf16"), [(torch.float32, True), (torch.bfloat16, False)])
def test_training_precision_other_than_the_models_dtype_trains_after_selection(tmp_path, pool, target, dtype, bf16):
    # The warm-up runs its own Trainer at the model's precision; the SFT run's accelerator is then built at
    # its own (TRL's bf16 default with an fp32 model, or a bf16 model trained without autocast).
    model, tokenizer = tiny_causal_lm(seed=0)
    model = model.to(dtype)
    args = config(tmp_path, bf16=bf16, influence_budget=4, influence_options=FAST, max_steps=1, learning_rate=1e-2)
    trainer = InfluenceSFTTrainer(model, args=args, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer)
    assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


class Snapshots(TrainerCallback):
    """Copies of the model and its torch optimizer (state included) after each optimizer step."""

    def __init__(self):
        self.after_step = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after_step[state.global_step] = copy.deepcopy((model, optimizer.optimizer))


@pytest.mark.parametrize("with_work_dir", [False, True])
@pytest.mark.slow
def test_online_reselects_at_the_stated_steps_from_the_current_model_and_optimizer(tmp_path, pool, target,
                                                                                    with_work_dir):
    model, tokenizer = tiny_causal_lm(seed=0)
    options = {**FAST, "show_progress": False}
    if with_work_dir:  # each round keeps its stores in a folder of its own (its adapter weights differ)
        options["work_dir"] = str(tmp_path / "stores")
    args = config(tmp_path, influence_mode="online", influence_reselect_steps=2, influence_budget=4,
                  influence_method="influence_distillation_exact", influence_options=options, max_steps=6,
                  learning_rate=5e-2, seed=3)
    snapshots = Snapshots()
    trainer = Recording(model, args=args, train_dataset=pool, target_dataset=target, processing_class=tokenizer,
                        peft_config=LoraConfig(**LORA), callbacks=[snapshots])
    trainer.train()

    selections = trainer.influence_selections
    assert [selection.step for selection in selections] == [0, 2, 4]
    for selection, steps in zip(selections, [{0, 1}, {2, 3}, {4, 5}], strict=True):
        assert sorted(trainer.rows_of_steps(steps)) == sorted(selection.row_ids)  # budget = rows per round
    for selection in selections[1:]:
        model_then, optimizer_then = snapshots.after_step[selection.step]
        expected = select_by_influence(pool, target, model=model_then, tokenizer=tokenizer, budget=4,
                                       method="influence_distillation_exact", optimizer=optimizer_then,
                                       selection_seed=3, return_scores=True,
                                       **{k: v for k, v in options.items() if k != "work_dir"})[1]
        assert selection.row_ids == expected.provenance["selected_pool_row_ids"]
    assert selections[1].row_ids != selections[0].row_ids or selections[2].row_ids != selections[1].row_ids
    rounds = [entry["influence/round"] for entry in trainer.state.log_history if "influence/round" in entry]
    assert rounds == [0, 1, 2]
    if with_work_dir:
        assert sorted(path.name for path in (tmp_path / "stores").iterdir()) == ["step-0", "step-2", "step-4"]


@pytest.mark.parametrize("source", ["object", "hub"])
@pytest.mark.slow
def test_weights_from_a_score_table_are_rescaled_to_mean_one_and_reach_the_batches(tmp_path, pool, source, request):
    model, tokenizer = tiny_causal_lm(seed=0)
    raw = torch.rand(len(pool), generator=torch.Generator().manual_seed(5))
    raw[2] = 0.0
    table, _ = score_table(len(pool), weights=raw)
    kwargs, overrides = {"influence_score_table": table}, {}
    if source == "hub":  # through the loopback Hub with the real clients
        hub = request.getfixturevalue("local_hub")
        push_score_table(table, f"{hub.user}/scores", config_name="math")
        kwargs, overrides = {}, {"influence_score_table": f"{hub.user}/scores", "influence_score_table_config": "math"}
    seen_weights = {}

    class WeightRecording(InfluenceSFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen_weights.update(zip(inputs["row_id"].tolist(), inputs["weight"].tolist()))
            return super().training_step(model, inputs, num_items_in_batch)

    args = config(tmp_path, influence_mode="weight", num_train_epochs=1, **overrides)
    trainer = WeightRecording(model, args=args, train_dataset=pool, processing_class=tokenizer, **kwargs)
    trainer.train()
    expected = raw * len(raw) / raw.sum()
    assert sorted(seen_weights) == list(range(len(pool)))
    torch.testing.assert_close(torch.tensor([seen_weights[i] for i in range(len(pool))]), expected)
    logged = trainer.state.log_history[0]
    assert logged["influence/mean_weight"] == pytest.approx(float(raw.mean()), rel=1e-6)
    assert logged["influence/zero_weight_share"] == pytest.approx(1 / len(pool))


def test_weights_from_the_target_are_the_robust_weights_of_compute_scores(tmp_path, pool, target):
    model, tokenizer = tiny_causal_lm(seed=0)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
    options = {**FAST, "optimizer_state": "gd", "show_progress": False}
    run = compute_scores(pool, target, model=copy.deepcopy(model), tokenizer=tokenizer,
                         method="influence_distillation_exact", selection_seed=42, **options)
    args = config(tmp_path, influence_mode="weight", influence_method="influence_distillation_exact",
                  influence_options=options, max_steps=1)
    trainer = InfluenceSFTTrainer(model, args=args, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer)
    (selection,) = trainer.influence_selections
    assert selection.row_ids == run.pool_row_ids and selection.source == "target"
    expected = run.output.weights.double()
    torch.testing.assert_close(selection.weights, (expected * len(expected) / expected.sum()).float())
    assert trainer.train_dataset["weight"] == selection.weights.tolist()
    assert selection.provenance["method"] == "influence_distillation_exact"
    with pytest.raises(ValueError, match="'rds' gives no per-sample weights"):
        InfluenceSFTTrainer(model, args=config(tmp_path, influence_mode="weight", influence_method="rds"),
                            train_dataset=pool, target_dataset=target, processing_class=tokenizer)


def test_config_parses_from_the_command_line(tmp_path):
    parser = HfArgumentParser(InfluenceSFTConfig)
    cpu = ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false"]
    (args,) = parser.parse_args_into_dataclasses(
        [*cpu, "--influence_mode", "weight", "--influence_budget", "100",
         "--influence_options", '{"num_landmarks": 8}', "--influence_loss_normalization", "token"])
    assert args.influence_budget == 100 and isinstance(args.influence_budget, int)
    assert args.influence_options == {"num_landmarks": 8} and args.influence_loss_normalization == "token"
    (share,) = parser.parse_args_into_dataclasses([*cpu, "--influence_budget", "0.25"])
    assert share.influence_budget == 0.25
    assert "influence_reselect_steps" in parser.format_help()


WEIGHT = {"influence_mode": "weight"}
ONLINE = {"influence_mode": "online", "influence_reselect_steps": 1}


@pytest.mark.parametrize(
    ("overrides", "make", "error", "match"),
    [
        ({**WEIGHT, "packing": True, "max_length": 64}, {}, ValueError, "packing=True cannot be combined"),
        ({**ONLINE, "padding_free": True}, {}, ValueError, "padding_free=True cannot be combined"),
        ({}, {}, ValueError, "needs target_dataset .* or a score table"),
        ({"influence_budget": 100}, {"target": True}, SelectionError, "larger than the pool"),
        (WEIGHT, {}, ValueError, "needs weights: .*pool column 'weight'"),
        (WEIGHT, {"weights": [1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0]}, ValueError, "row id 3 has -1.0"),
        (WEIGHT, {"weights": [1.0, float("nan")] + [1.0] * 6}, ValueError, "row id 1 has nan"),
        (WEIGHT, {"weights": [0.0] * 8}, ValueError, "Every training row has weight 0"),
        (WEIGHT, {"table": "no_weights"}, ValueError, "score table has no weights"),
        (WEIGHT, {"table": "negative_weights"}, ValueError, "pool row id 0 has -1.0"),
        ({}, {"table": "unknown_rows"}, ValueError, "pool_row_id 8 .* no pool row has"),
        ({}, {"table": "object", "target": True}, ValueError, "not both"),
        ({**WEIGHT, "loss_type": "dft"}, {}, ValueError, "loss_type must be 'nll'"),
        ({"influence_mode": "online"}, {}, ValueError, "needs influence_reselect_steps"),
        ({"influence_reselect_steps": 2}, {}, ValueError, "only used by influence_mode='online'"),
        ({"influence_mode": "pick"}, {}, ValueError, "influence_mode must be one of"),
        ({"influence_budget": 1.5}, {}, ValueError, r"pool share must be in \(0, 1\]"),
        ({"influence_options": {"num_landmark": 3}}, {}, TypeError, "unknown option 'num_landmark'"),
        ({"influence_options": {"method": "less"}}, {}, ValueError, "use influence_method"),
        ({**ONLINE, "influence_budget": 4}, {"target": True, "peft": True}, ValueError, "larger than the 2 rows"),
        (ONLINE, {"target": True}, ValueError, "train a PEFT model"),
        ({}, {"target": True, "row_ids": ["a"] * 8}, TypeError, "must hold integer row ids"),
        ({}, {"target": True, "row_ids": [0, 1, 2, 3, 4, 5, 6, 0]}, ValueError, "repeats row id 0"),
        ({}, {"plain_args": True}, TypeError, "must be an InfluenceSFTConfig"),
    ],
)
def test_clear_errors(tmp_path, overrides, make, error, match):
    model, tokenizer = tiny_causal_lm(seed=0)
    pool = loss_rows(tokenizer, make.get("weights"))
    if "row_ids" in make:
        pool = pool.remove_columns("row_id").add_column("row_id", make["row_ids"])
    kwargs = {"processing_class": tokenizer}
    if make.get("target"):
        kwargs["target_dataset"] = CHAT_ROWS[:2]
    if make.get("peft"):
        kwargs["peft_config"] = LoraConfig(**LORA)
    table = make.get("table")
    if table is not None:
        num_rows = 9 if table == "unknown_rows" else len(pool)
        weights = {"negative_weights": -torch.ones(num_rows), "object": torch.ones(num_rows)}.get(table)
        kwargs["influence_score_table"] = score_table(num_rows, weights)[0]
    with pytest.raises(error, match=match):
        args = SFTConfig(**settings(tmp_path)) if make.get("plain_args") else config(tmp_path, **overrides)
        InfluenceSFTTrainer(model, args=args, train_dataset=pool, **kwargs)


@pytest.mark.slow
def test_two_processes_select_the_same_rows_and_take_the_weighted_step_of_all_their_samples(tmp_path, pool, target):
    """torchrun, 2 CPU processes (gloo, DDP): this file is the worker (see the end of the file)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), __file__, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    # Select mode: one selection for both ranks, the single-process one; each rank trains on its share of it.
    expected = select_by_influence(pool, target, model=tiny_causal_lm(seed=0)[0], tokenizer=tiny_causal_lm()[1],
                                   budget=4, method="rds", selection_seed=42, show_progress=False,
                                   return_scores=True)[1].provenance["selected_pool_row_ids"]
    assert ranks[0]["selected"] == ranks[1]["selected"] == expected
    assert sorted(ranks[0]["select_seen"] + ranks[1]["select_seen"]) == sorted(expected)
    # Weight mode: the step is the 2 x 2 rows of both ranks; after DDP's all-reduce every rank holds the gradient
    # of the weighted mean over all four, as in one process.
    step_rows = ranks[0]["weight_seen"] + ranks[1]["weight_seen"]
    assert len(set(step_rows)) == 4
    model, tokenizer = tiny_causal_lm(seed=0)
    expected_loss, expected_gradients = reference(model, loss_rows(tokenizer, RAW_WEIGHTS), step_rows, "sample")
    assert ranks[0]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for rank in (0, 1):
        gradients = load_file(tmp_path / f"gradients{rank}.safetensors")
        for name, gradient in expected_gradients.items():
            torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-7, msg=name)


def distributed_worker(output: Path) -> None:
    """One of the processes of the two-process test: writes what it selected, trained on and its gradients."""
    model, tokenizer = tiny_causal_lm(seed=0)
    args = config(output, influence_budget=4, influence_method="rds", num_train_epochs=1)
    trainer = Recording(model, args=args, train_dataset=demo_pool(4, seed=0),
                        target_dataset=demo_target("math", 2, seed=1), processing_class=tokenizer)
    trainer.train()
    record = {"selected": trainer.influence_selections[0].row_ids, "select_seen": trainer.rows_of_steps({0})}

    model, tokenizer = tiny_causal_lm(seed=0)
    recorder = GradientRecorder()
    args = config(output, influence_mode="weight", max_steps=1, max_grad_norm=0.0)
    trainer = Recording(model, args=args, train_dataset=loss_rows(tokenizer, RAW_WEIGHTS), processing_class=tokenizer,
                        callbacks=[recorder])
    trainer.train()
    rank = trainer.accelerator.process_index
    record.update(weight_seen=trainer.rows_of_steps({0}), loss=trainer.state.log_history[0]["loss"])
    save_file(recorder.gradients[0], output / f"gradients{rank}.safetensors")
    (output / f"rank{rank}.json").write_text(json.dumps(record))
    end_distributed_worker()


if __name__ == "__main__":
    distributed_worker(Path(sys.argv[1]))


@pytest.mark.parametrize("selection", ["less", "round_robin_task"])
def test_a_score_table_keeps_its_target_tasks_for_the_rules_that_group_by_them(tmp_path, pool, selection):
    """A table made with selection='less' (mean within each target task, then max over tasks) gives the trainer
    the rows select_by_influence picked: without the recorded tasks each target column would count as a task."""
    import datasets

    from hf_influence.demo import demo_target

    target = datasets.concatenate_datasets([demo_target("math", 3, seed=1), demo_target("code", 3, seed=1)])
    model, tokenizer = tiny_causal_lm(seed=0)
    selected, table = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5, method="less",
                                          selection=selection, return_scores=True, show_progress=False, **FAST)
    assert set(table.provenance["target_tasks"].values()) == {"math", "code"}
    scores, row_ids, targets = table.to_matrix()
    from hf_influence.selection.rules import select_indices

    ungrouped = select_indices(scores, 5, rule="less") if selection == "less" else None
    args = config(tmp_path, influence_budget=5, influence_options={"selection": selection, "selection_seed": 0},
                  num_train_epochs=1)
    trainer = Recording(tiny_causal_lm(seed=0)[0], args=args, train_dataset=pool, influence_score_table=table,
                        processing_class=tokenizer)
    chosen = trainer.influence_selections[0].row_ids
    assert chosen == [pool["id"].index(i) for i in selected["id"]]
    if ungrouped is not None:  # the grouping changes the rows here, so the check above could fail
        assert [row_ids[i] for i in ungrouped.tolist()] != chosen


def test_a_score_table_made_for_other_rows_is_refused_before_any_model_pass(tmp_path, pool):
    _, table = select_by_influence(pool, demo_target("math", 2, seed=1), budget=4, method="random",
                                   return_scores=True)
    model, tokenizer = tiny_causal_lm(seed=0)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    table.save(tmp_path / "scores")
    args = config(tmp_path, influence_score_table=str(tmp_path / "scores"), influence_budget=4)
    InfluenceSFTTrainer(model, args=args, train_dataset=pool, processing_class=tokenizer)  # the rows it scored
    reordered = pool.shuffle(seed=3)
    with pytest.raises(ValueError, match="other content than the rows it scored.*influence_allow_stale_table"):
        InfluenceSFTTrainer(model, args=args, train_dataset=reordered, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"columns \['messages'\] that train_dataset lacks"):
        InfluenceSFTTrainer(model, args=args, train_dataset=pool.rename_column("messages", "conversation"),
                            processing_class=tokenizer)
    assert forwards == []
    stale = config(tmp_path, influence_score_table=str(tmp_path / "scores"), influence_budget=4,
                   influence_allow_stale_table=True)
    trainer = InfluenceSFTTrainer(model, args=stale, train_dataset=reordered, processing_class=tokenizer)
    assert len(trainer.influence_selections[-1].row_ids) == 4


def test_select_mode_scores_at_the_sft_max_length_and_prepares_through_trls_constructor(tmp_path, pool, target):
    """One max_length: rows are scored at SFTConfig.max_length, the length they train at (influence_options'
    own max_length is deprecated). Select mode selects before SFTTrainer is built, so TRL's public constructor
    prepares exactly the selected rows: no private TRL method is overridden."""
    assert "_prepare_dataset" not in InfluenceSFTTrainer.__dict__
    model, tokenizer = tiny_causal_lm(seed=0)
    args = config(tmp_path, influence_budget=3, influence_method="rds", max_length=24, max_steps=1)
    trainer = InfluenceSFTTrainer(model, args=args, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer)
    selection = trainer.influence_selections[0]
    assert selection.provenance["configs"]["FormattingConfig"]["max_length"] == 24
    assert len(trainer.train_dataset) == 3 and max(map(len, trainer.train_dataset["input_ids"])) <= 24
    assert trainer.train_dataset["row_id"] == selection.row_ids  # TRL kept the selection order
    with pytest.warns(FutureWarning, match=r"influence_options\['max_length'\] is deprecated"):
        config(tmp_path, influence_options={"max_length": 32})


def test_the_card_names_a_base_model_loaded_by_id_even_from_a_local_copy():
    """TRL writes "[None]" when the model came from a folder; load_model records the id it was asked for (the
    offline copy of the default model included), which the card then links; a local folder is named as one."""
    from huggingface_hub import ModelCard, ModelCardData

    from hf_influence.trainer import _name_the_base_model

    text = "This model is a fine-tuned version of [None](https://huggingface.co/None).\n"
    card = ModelCard.from_template(ModelCardData(), template_str="---\n{{ card_data }}\n---\n" + text)
    _name_the_base_model(card, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card.text
    local = ModelCard.from_template(ModelCardData(), template_str="---\n{{ card_data }}\n---\n" + text)
    _name_the_base_model(local, "/models/my-llm")
    assert local.data.base_model is None and "the local model `/models/my-llm`" in local.text


def test_select_mode_loads_a_model_id_once_and_trains_the_object_that_scored(tmp_path, pool, target, monkeypatch,
                                                                             caplog):
    """Given a model id, select mode loads it once, as TRL would (model_init_kwargs applied), scores with it and
    hands that object to SFTTrainer: no second load, no warning that model_init_kwargs were ignored, and the
    user's config keeps its model_init_kwargs."""
    import transformers

    model, tokenizer = tiny_causal_lm(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, name, *args, **kwargs):
        loads.append((str(name), kwargs.get("dtype")))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    args = config(tmp_path, influence_budget=3, influence_method="rds", max_steps=1,
                  model_init_kwargs={"dtype": "float32"})
    trainer = InfluenceSFTTrainer(str(tmp_path / "model"), args=args, train_dataset=pool, target_dataset=target)
    assert loads == [(str(tmp_path / "model"), torch.float32)]
    assert args.model_init_kwargs == {"dtype": "float32"} and "will be ignored" not in caplog.text
    assert len(trainer.train_dataset) == 3
    trainer.train()


def test_text_rows_select_and_train_as_sft_trainer_takes_them(tmp_path):
    """TRL's language-modelling rows (a `text` column) go through select mode: scored as every-token rows, the
    same rows select_by_influence picks, then prepared and trained by TRL."""
    from datasets import Dataset

    pool = Dataset.from_list([{"text": m[0]["content"] + "\n" + m[1]["content"]} for m in demo_pool(3)["messages"]])
    target = [{"text": row["prompt"] + "\n" + row["solution"]} for row in demo_target("math", 3)]
    base, tokenizer = tiny_causal_lm(seed=0)
    expected = select_by_influence(pool, target, model=tiny_causal_lm(seed=0)[0], tokenizer=tokenizer, budget=4,
                                   selection_seed=42, max_length=64, show_progress=False, return_scores=True,
                                   **FAST)[1].provenance["selected_pool_row_ids"]
    args = config(tmp_path, influence_budget=4, influence_options=FAST, max_steps=1, max_length=64)
    trainer = InfluenceSFTTrainer(base, args=args, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer)
    assert trainer.influence_selections[0].row_ids == expected
    assert trainer.train_dataset["row_id"] == expected and "input_ids" in trainer.train_dataset.column_names
    trainer.train()


def test_every_mode_has_one_strategy():
    """The trainer asks its mode's strategy object instead of comparing names: one per InfluenceSFTConfig mode."""
    from hf_influence.trainer_config import MODES
    from hf_influence.trainer_modes import MODE_STRATEGIES

    assert tuple(MODE_STRATEGIES) == MODES
    assert [strategy.name for strategy in MODE_STRATEGIES.values()] == list(MODES)
