"""The Tulu V2 recipes (recipes/tulu_v2): each YAML parses into its command's dataclasses with exactly its values,
run.py composes the arguments in the documented order, and every recipe runs end to end offline through run.py
on a tiny model and the shared pool (the NN-CIFT recipe pushing to a loopback Hub)."""

import dataclasses
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import hub_server
import pytest
import yaml
from datasets import Dataset
from huggingface_hub import ModelCard
from trl.chat_template_utils import qwen2_5_chat_template

from hf_influence import DEFAULT_MODEL, InfluenceNetwork, ScoreTable, cli, load_score_table
from hf_influence.cli import arguments
from hf_influence.data import load_rows, sample_rows
from hf_influence.models import LoraSettings
from hf_influence.options import SHARED_CONFIG_TYPES, method_config_types
from hf_influence.selection.rules import select_indices
from hf_influence.testing import tiny_causal_lm
from hf_influence.trainer import InfluenceSFTTrainer
from hf_influence.trainer_config import InfluenceSFTConfig

local_hub = hub_server.local_hub

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tulu_v2"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.exists(), reason="../shared/data is absent")
TASKS = ["gsm8k", "mmlu", "bbh", "tydiqa", "squad", "codex"]
TRAIN_TYPES = (arguments.TrainDataArguments, arguments.ModelArguments, LoraSettings, InfluenceSFTConfig)
NETWORK_TYPES = (arguments.SelectArguments, arguments.ModelArguments, *SHARED_CONFIG_TYPES,
                 *method_config_types("nn_cift"))
# What differs between the six train recipes; every other setting must be the same in all of them.
PER_TARGET_KEYS = {"target_task", "target_limit", "output_dir"}
CPU_FLAGS = ["--bf16", "false", "--tf32", "false"]
# SQuAD and Codex have no shared offline file: a few rows in their Hub schemas (as in test_targets.py).
HUB_SCHEMA_ROWS = {
    "squad": [{"id": f"q{i}", "title": "t", "context": f"Paris is in France. It has {i} bridges.",
               "question": "Where is Paris?", "answers": {"text": ["France"], "answer_start": [12]}} for i in range(4)],
    "codex": [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n",
               "test": "", "entry_point": f"f{i}"} for i in range(4)],
}


def _load_run_module():
    spec = importlib.util.spec_from_file_location("tulu_v2_run", RECIPES / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


run = _load_run_module()


def _fields(types) -> set[str]:
    return {f.name for dataclass_type in types for f in dataclasses.fields(dataclass_type)}


def _parsed(argv: list[str], types) -> dict:
    """Every parsed field by name (the names are unique across a command's dataclasses)."""
    return {name: value for parsed in arguments.parse(argv, types, "test", command="recipe")
            for name, value in vars(parsed).items()}


def _config(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


@pytest.mark.parametrize("task", TASKS)
def test_train_config_parses_to_its_values(task):
    config = _config(task)
    # arguments.parse ignores YAML keys that name no field: a misspelt key would silently fall back to its default.
    assert set(config) <= _fields(TRAIN_TYPES), set(config) - _fields(TRAIN_TYPES)
    # bf16 and tf32 need a GPU (transformers refuses them on a CPU); everything else parses as written.
    parsed = _parsed(["--config", str(RECIPES / f"{task}.yaml"), *CPU_FLAGS], TRAIN_TYPES)
    for key, value in config.items():
        if key not in ("bf16", "tf32"):
            assert parsed[key] == value, key
    assert config["bf16"] is True and config["tf32"] is True and config["target_task"] == task
    assert config["pool"] == "allenai/tulu-v2-sft-mixture" and config["influence_budget"] == 0.05
    assert config["influence_method"] == "influence_distillation" and config["influence_mode"] == "select"
    options = config["influence_options"]
    assert options["num_landmarks"] == 4096 and options["optimizer_state"] == "warmup"
    assert "max_length" not in options and config["max_length"] == 2048  # one max_length: scoring uses SFT's
    assert (config["num_train_epochs"], config["learning_rate"], config["lora_r"], config["lora_alpha"]) == (
        4, 2e-5, 128, 512)


def test_train_configs_differ_only_in_the_target():
    configs = {task: _config(task) for task in TASKS}
    for task, config in configs.items():
        options = dict(config["influence_options"])
        assert options.pop("work_dir") == "runs/tulu_v2/selection"  # shared: the pool side is the same for all
        shared = {key: value for key, value in config.items() if key not in PER_TARGET_KEYS}
        reference = {key: value for key, value in configs["gsm8k"].items() if key not in PER_TARGET_KEYS}
        reference["influence_options"] = {k: v for k, v in reference["influence_options"].items() if k != "work_dir"}
        assert {**shared, "influence_options": options} == reference, task


def test_network_config_parses_to_its_values():
    config = _config("network")
    assert set(config) <= _fields(NETWORK_TYPES), set(config) - _fields(NETWORK_TYPES)
    parsed = _parsed(["--config", str(RECIPES / "network.yaml")], NETWORK_TYPES)
    for key, value in config.items():
        assert parsed[key] == value, key
    assert config["oracle"] == "influence_distillation_exact" and config["block_fraction"] == 0.05
    # The oracle scores the gradients the SFT recipes select with.
    train = _config("gsm8k")
    for key in ("model", "lora_r", "lora_alpha", "lora_target_modules", "max_length"):
        assert config[key] == train[key], key
    for key in ("projection_dim", "warmup_fraction", "warmup_learning_rate"):
        assert config[key] == train["influence_options"][key], key


@needs_data
def test_run_composes_yaml_offline_settings_and_extra_flags_in_order(tmp_path):
    args = run.RecipeArguments(targets=["gsm8k"], offline=True, output_root=str(tmp_path))
    argv = run.train_argv("gsm8k", args, ["--lora_r", "4", "--learning_rate", "1e-4"])
    parsed = _parsed(argv, TRAIN_TYPES)
    assert parsed["learning_rate"] == 1e-4 and parsed["lora_r"] == 4  # flags after `--` win
    assert parsed["model"] == DEFAULT_MODEL and parsed["pool_sample"] == 128 and parsed["bf16"] is False
    assert parsed["max_steps"] == 4 and parsed["assistant_only_loss"] is False and parsed["tf32"] is False
    assert parsed["num_train_epochs"] == 4 and parsed["lora_alpha"] == 32 and parsed["lora_dropout"] == 0.1  # YAML
    assert parsed["pool"] == str(DATA_DIR / "pool.jsonl.gz") and parsed["data_dir"] == str(DATA_DIR)
    assert parsed["target"] == str(DATA_DIR / "targets" / "gsm8k_train.jsonl.gz")
    assert parsed["eval_target"] == str(DATA_DIR / "targets" / "gsm8k_test.jsonl.gz") and parsed["eval_limit"] == 16
    options = parsed["influence_options"]
    assert options == {**_config("gsm8k")["influence_options"], **run.OFFLINE_SELECTION_OPTIONS,
                       "work_dir": str(tmp_path / "selection")}
    assert parsed["output_dir"] == str(tmp_path / "gsm8k")

    # Without --offline the YAML's model and sizes stand; the shared files serve as target and held-out rows.
    gpu_args = run.RecipeArguments(targets=["mmlu"], data_dir=str(DATA_DIR))
    gpu = _parsed(run.train_argv("mmlu", gpu_args, CPU_FLAGS), TRAIN_TYPES)
    assert gpu["model"] == "Qwen/Qwen2.5-1.5B" and gpu["pool"] == "allenai/tulu-v2-sft-mixture"
    assert gpu["pool_sample"] == 200000 and gpu["influence_options"]["num_landmarks"] == 4096
    assert gpu["eval_target"] == str(DATA_DIR / "targets" / "mmlu_test.jsonl.gz") and gpu["eval_limit"] == 1000
    # Tasks whose target and held-out rows share one split get no held-out measurement.
    assert "--eval_target" not in run.train_argv("bbh", args, [])

    with pytest.raises(ValueError, match=r"no target rows for \['squad', 'codex'\].*squad=PATH codex=PATH"):
        run.RecipeArguments(targets=["gsm8k", "squad", "codex"], offline=True)
    with pytest.raises(ValueError, match="--targets must name tasks"):
        run.RecipeArguments(targets=["gsm9k"])
    with pytest.raises(ValueError, match="TASK=PATH"):
        run.RecipeArguments(target_files=["squad:file.jsonl"])


def test_pool_sample_is_the_train_commands_sample():
    rows = Dataset.from_dict({"id": list(range(50))})
    assert run.sample_rows is cli.train.sample_rows  # one sampler, so a pushed table's row ids index the SFT pool
    assert run.sample_rows(rows, 20, seed=3)["id"] == rows.shuffle(seed=3)["id"][:20]
    assert run.sample_rows(rows, None, seed=3)["id"] == list(range(50))


def test_held_out_split_from_the_hub(local_hub, tmp_path, monkeypatch):
    gsm8k_repo = f"{local_hub.user}/gsm8k"
    test_rows = {"question": ["1+1?", "2+3?"], "answer": ["#### 2", "#### 5"]}
    Dataset.from_dict({"question": ["9+9?"], "answer": ["#### 18"]}).push_to_hub(gsm8k_repo, config_name="main")
    Dataset.from_dict(test_rows).push_to_hub(gsm8k_repo, config_name="main", split="test")
    monkeypatch.setitem(run.HELD_OUT, "gsm8k", run.HeldOut(f"{gsm8k_repo}:main", "test", "targets/absent", 2))
    source = run.held_out_source("gsm8k", run.RecipeArguments(targets=["gsm8k"]), tmp_path / "gsm8k")
    assert load_rows(source).to_dict() == test_rows


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A tiny Llama whose tokenizer carries Qwen2.5's chat template, so TRL's assistant-only loss applies as on
    the recipes' model."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    tokenizer.chat_template = qwen2_5_chat_template
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def short_pool(tmp_path_factory):
    """64 rows of the shared pool (seeded draw) short enough for the tiny model's byte-level tokenizer to keep
    every batch small: long rows would only slow the JVP and gradient passes down here."""
    rows = load_rows(str(DATA_DIR / "pool.jsonl.gz")).shuffle(seed=0).select(range(2000))
    short = rows.filter(lambda row: sum(len(m["content"]) for m in row["messages"]) < 400).select(range(64))
    path = tmp_path_factory.mktemp("pool") / "short_pool.jsonl"
    short.to_json(path)
    return str(path)


def _target_file_flags(task: str, folder: Path) -> list[str]:
    if task not in HUB_SCHEMA_ROWS:
        return []
    path = folder / f"{task}.jsonl"
    Dataset.from_list(HUB_SCHEMA_ROWS[task]).to_json(path)
    return ["--target_files", f"{task}={path}"]


@needs_data
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.slow
def test_train_recipe_runs_offline(task, tiny_model_folder, short_pool, tmp_path):
    # gsm8k also trains with the recipes' assistant-only loss (TRL's Qwen2.5 training template).
    loss_flags = ["--assistant_only_loss", "true"] if task == "gsm8k" else []
    results = run.main(["--targets", task, "--offline", "--pool", short_pool, "--output_root", str(tmp_path),
                        *_target_file_flags(task, tmp_path), "--", "--model", tiny_model_folder,
                        "--pool_sample", "32", "--disable_tqdm", "true", *loss_flags])
    output = tmp_path / task
    summary = json.loads((output / "summary.json").read_text())
    assert results == {task: summary} and json.loads((tmp_path / "summary.json").read_text()) == {task: summary}
    influence = summary["influence"]
    assert (influence["mode"], influence["method"], influence["source"]) == ("select", "influence_distillation",
                                                                             "target")
    assert summary["pool_rows"] == 32 and 1 <= influence["training_rows"] <= influence["budget"] == 2
    assert summary["target_rows"] == (4 if task in HUB_SCHEMA_ROWS else 8) and summary["global_steps"] == 4
    if task in run.HELD_OUT:
        assert summary["eval_rows"] == 16
        assert math.isfinite(summary["target_loss_before"]) and math.isfinite(summary["target_loss_after"])
    else:
        assert "target_loss_before" not in summary and "eval_rows" not in summary
    assert (output / "adapter_model.safetensors").exists() and (output / "adapter_config.json").exists()
    card = ModelCard.load(output / "README.md")
    assert "hf_influence" in card.data.tags and card.data.to_dict()["hf_influence"]["method"] == "influence_distillation"
    # The stores went to the work_dir run.py set under --output_root, shared by the targets.
    assert len(list((output.parent / "selection").glob("landmark_gradients-*/manifest.json"))) == 1


def _card_provenance(output: Path) -> dict:
    """The score provenance InfluenceSFTTrainer writes into the model card's text."""
    text = ModelCard.load(output / "README.md").text
    return json.loads(re.search(r"```json\n(.*?)\n```", text, re.DOTALL).group(1))


@needs_data
@pytest.mark.slow
def test_train_recipe_under_accelerate_launch_selects_as_one_process(tiny_model_folder, short_pool, tmp_path):
    flags = ["--targets", "bbh", "--offline", "--pool", short_pool]
    extra = ["--", "--model", tiny_model_folder, "--pool_sample", "32", "--disable_tqdm", "true"]
    single = run.main([*flags, "--output_root", str(tmp_path / "one"), *extra])["bbh"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    # accelerate 1.x starts a single process for --cpu; --multi_gpu goes through torchrun, gloo without GPUs.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([*launch, str(RECIPES / "run.py"), *flags, "--output_root", str(tmp_path / "two"), *extra],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("target    trained rows") == 1  # the table comes from the main process only
    two = json.loads((tmp_path / "two" / "bbh" / "summary.json").read_text())
    assert two["influence"] == single["influence"] and two["global_steps"] == single["global_steps"] == 4
    selected = _card_provenance(tmp_path / "one" / "bbh")["selected_pool_row_ids"]
    assert selected and _card_provenance(tmp_path / "two" / "bbh")["selected_pool_row_ids"] == selected


@needs_data
@pytest.mark.slow
def test_network_recipe_fits_and_pushes(local_hub, tmp_path):
    repo_id = f"{local_hub.user}/tulu-v2-id"
    reports = run.main(["--targets", "gsm8k", "--offline", "--network", "--repo_id", repo_id,
                        "--output_root", str(tmp_path), "--", "--oracle", "delift_se", "--show_progress", "false"])
    report = reports["gsm8k"]
    assert report["oracle"] == "delift_se" and report["pool_rows"] == 128 and report["target_rows"] == 8
    assert report["training"]["block_rows"] == 32 and "Q4" in report["evaluation"]
    output = tmp_path / "network" / "gsm8k"
    local_table = ScoreTable.load(output / "scores")
    pushed_table = load_score_table(f"{repo_id}-scores", config_name="gsm8k")
    assert pushed_table.to_matrix()[0].tolist() == local_table.to_matrix()[0].tolist()
    network = InfluenceNetwork.from_pretrained(f"{repo_id}-gsm8k")
    local_network = InfluenceNetwork.from_pretrained(str(output / "network"))
    assert all((a == b).all() for a, b in zip(network.state_dict().values(), local_network.state_dict().values()))
    assert {"hf_influence", "nn-cift"} <= set(ModelCard.load(f"{repo_id}-gsm8k").data.tags)
    # The network scored the train recipe's own pool sample: its pool_row_id indexes `--pool_sample 128`, and the
    # pushed table drives InfluenceSFTTrainer on that pool with no model pass (the README's example).
    pool = load_rows(next((tmp_path / "network").glob("pool-*.parquet")))
    assert pool["id"] == sample_rows(load_rows(str(DATA_DIR / "pool.jsonl.gz")), 128, 0)["id"]
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    args = InfluenceSFTConfig(str(tmp_path / "sft"), influence_budget=6, influence_score_table=f"{repo_id}-scores",
                              influence_score_table_config="gsm8k", max_steps=1, bf16=False, report_to="none")
    trainer = InfluenceSFTTrainer(model, args=args, train_dataset=pool, processing_class=tokenizer)
    selection = trainer.influence_selections[-1]
    scores, row_ids, _ = pushed_table.to_matrix()
    # DELIFT-SE's paper selects by facility location: the table records it and the trainer follows it.
    assert pushed_table.provenance["selection"] == "facility_location"
    expected = select_indices(scores, 6, rule="facility_location", seed=args.seed).tolist()
    assert selection.source == "score_table" and selection.row_ids == [row_ids[i] for i in expected]


@needs_data
@pytest.mark.slow
def test_pretrained_network_recipe_serves_new_pools_and_targets(local_hub, tmp_path, monkeypatch):
    from hf_influence import load_target, select_with_network
    from hf_influence.networks.oracles import Oracle

    repo_id = f"{local_hub.user}/tulu-v2-nn-cift"
    report = run.main(["--targets", "gsm8k", "mmlu", "--offline", "--pretrained", "--repo_id", repo_id,
                       "--output_root", str(tmp_path), "--", "--oracle", "delift_se",
                       "--show_progress", "false"])["pretrained"]
    # One network over both tasks' target rows, pushed with its card and figures.
    assert report["target_rows"] == 16 and report["network_repo"].endswith(repo_id)
    target = load_rows(next((tmp_path / "network").glob("pretrained-target-*.parquet")))
    assert {task.split("/")[0] for task in target["task"]} == {"gsm8k", "mmlu"}
    network = InfluenceNetwork.from_pretrained(repo_id)
    assert network.metrics["Q4"]["rows"] > 0
    assert "| Q4 |" in ModelCard.load(repo_id).text
    # Pulled by repo id, it selects from other pool rows for a task it never saw, with no oracle call.
    monkeypatch.setattr(Oracle, "compute_block", None)  # any oracle call would fail
    pool = load_rows(str(DATA_DIR / "pool.jsonl.gz")).select(range(5000, 5040))
    selected = select_with_network(pool, load_target("bbh", data_dir=DATA_DIR, limit=6), repo_id, budget=5,
                                   show_progress=False)
    assert len(set(selected["id"])) == 5
