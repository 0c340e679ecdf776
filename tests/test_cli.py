"""The CLI: option help from the fields' metadata, YAML defaults under flags, and runs of every command."""

import json
import os

import hub_server
import pytest

from hf_influence import cli
from hf_influence.cli.arguments import parse
from hf_influence.extraction.gradients import GradientConfig
from hf_influence.testing import tiny_causal_lm

local_hub = hub_server.local_hub


def test_every_option_has_help_in_its_field_metadata():
    """TRL's convention: the help is the field's metadata, defined once, beside the field."""
    from dataclasses import fields

    from hf_influence.cli import arguments
    from hf_influence.options import config_types

    types = (*config_types(), arguments.ModelArguments, arguments.DataArguments, arguments.DemoArguments,
             arguments.SelectArguments, arguments.HubArguments, arguments.TrainDataArguments)
    missing = [f"{t.__name__}.{f.name}" for t in types for f in fields(t) if not f.metadata.get("help")]
    assert not missing


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_gradients_help_shows_the_field_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gradients", "--help"])
    text = capsys.readouterr().out
    for field in GradientConfig.__dataclass_fields__:
        assert f"--{field}" in text
    assert "output dimension k of the projection" in text and "adapter rank" in text


def test_yaml_defaults_and_flag_override(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("projection_dim: 128\nprojection_seed: 5\n")
    (parsed,) = parse(["--config", str(config), "--projection_seed", "9"], (GradientConfig,), "test", command="gradients")
    assert parsed.projection_dim == 128 and parsed.projection_seed == 9
    (parsed,) = parse(["--config", str(config)], (GradientConfig,), "test", command="gradients")
    assert parsed.projection_seed == 5
    with pytest.raises(SystemExit):
        parse(["--no_such_option", "1"], (GradientConfig,), "test", command="gradients")
    with pytest.raises(SystemExit):  # no prefix abbreviations
        parse(["--projection_d", "64"], (GradientConfig,), "test", command="gradients")
    config.write_text("projection_dim: 128\nprojektion: srht\n")  # a typo must not be ignored
    with pytest.raises(SystemExit):
        parse(["--config", str(config)], (GradientConfig,), "test", command="gradients")


def test_the_old_seed_option_still_sets_the_projection_seed_with_a_warning(tmp_path):
    """`seed` read as the selection's seed but was GradientConfig's projection seed: renamed projection_seed; the
    old name keeps working for a while, with a FutureWarning, in the CLI, YAML and the Python API."""
    from hf_influence.options import split_options

    with pytest.warns(FutureWarning, match="--seed is deprecated"):
        (parsed,) = parse(["--seed", "4"], (GradientConfig,), "test", command="gradients")
    assert parsed.projection_seed == 4
    config = tmp_path / "config.yaml"
    config.write_text("seed: 6\n")
    with pytest.warns(FutureWarning, match="the key `seed` is deprecated"):
        (parsed,) = parse(["--config", str(config)], (GradientConfig,), "test", command="gradients")
    assert parsed.projection_seed == 6
    with pytest.warns(FutureWarning, match="projection_seed=... \\(the same meaning\\)"):
        configs = split_options({"seed": 3})
    assert configs[GradientConfig].projection_seed == 3


def test_gradients_command_on_a_local_model_and_file(tmp_path, capsys):
    model, tokenizer = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?", "completion": str(i + 1)}) for i in range(5)))
    cli.main(["gradients", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "store"),
              "--projection_dim", "64", "--lora_r", "2", "--batch_size", "2", "--show_progress", "false"])
    assert "5 rows x 64 gradient store" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["num_rows"] == 5 and manifest["config"]["projection_dim"] == 64
    with pytest.raises(SystemExit) as stop:  # a user error: one line naming the file, exit code 2
        cli.main(["gradients", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "missing.jsonl")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # (after the model's loading bar)
    assert last.startswith("hf-influence gradients: error:") and "missing.jsonl" in last
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):  # --debug keeps the exception and traceback
        cli.main(["gradients", "--debug", "--model", str(tmp_path / "model"), "--data",
                  str(tmp_path / "missing.jsonl")])


FAST_FLAGS = ["--num_blocks", "1", "--warmup_min_steps", "2", "--projection_dim", "128", "--jvp_projection_dim", "64", "--warmup_fraction", "0.25",
              "--show_progress", "false", "--warmup_show_progress", "false"]


@pytest.fixture
def tiny_model_folder(tmp_path):
    model, tokenizer = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_select_command_writes_rows_scores_and_report(tmp_path, tiny_model_folder, capsys):
    from hf_influence import ScoreTable
    from hf_influence.demo import demo_pool, demo_target

    demo_pool(4, seed=0).to_json(tmp_path / "pool.jsonl")
    demo_target("code", 3, seed=1).to_json(tmp_path / "target.jsonl")
    output = tmp_path / "selection"
    report = cli.run_select(["--pool", str(tmp_path / "pool.jsonl"), "--target", str(tmp_path / "target.jsonl"),
                             "--budget", "0.25", "--output", str(output), "--model", tiny_model_folder,
                             "--num_landmarks", "8", *FAST_FLAGS])
    rows = [json.loads(line) for line in (output / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"id", "source", "messages"}
    table = ScoreTable.load(output / "scores")
    assert table.provenance["selected_pool_row_ids"] and int(table.landmark_mask.sum()) == 8
    assert json.loads((output / "report.json").read_text()) == report
    assert sum(report["pool_share"].values()) == pytest.approx(1.0)
    # The landmark diagnostics travel into report.json and the printed report.
    assert report["landmarks"] == table.provenance["details"]["landmarks"]
    assert report["landmarks"]["num_landmarks"] == 8 and -1.0 <= report["landmarks"]["loo_spearman"] <= 1.0
    assert report["landmarks"]["landmark_share_selected"] == pytest.approx(
        float(table.landmark_mask[table.provenance["selected_pool_row_ids"]].float().mean()))
    printed = capsys.readouterr().out
    assert "selected share" in printed and "leave-one-out Spearman" in printed
    # --save_scores false streams the selection: the same rows in the same order, no scores/ folder.
    streamed = tmp_path / "streamed"
    cli.run_select(["--pool", str(tmp_path / "pool.jsonl"), "--target", str(tmp_path / "target.jsonl"),
                    "--budget", "0.25", "--output", str(streamed), "--model", tiny_model_folder,
                    "--num_landmarks", "8", "--save_scores", "false", *FAST_FLAGS])
    assert (streamed / "selected.jsonl").read_text() == (output / "selected.jsonl").read_text()
    report = json.loads((streamed / "report.json").read_text())
    assert not (streamed / "scores").exists() and {"total", "landmark_gradients"} <= set(report["seconds"])
    assert report["landmarks"]["num_landmarks"] == 8 and report["exact_gradients"]["exact_gradient_rows"] >= 8
    assert "stages:" in capsys.readouterr().out  # the streamed run reports its stages as a stored one does
    with pytest.raises(SystemExit, match="budget"):
        cli.run_select(["--pool", str(tmp_path / "pool.jsonl"), "--target", str(tmp_path / "target.jsonl"),
                        "--budget", "lots", "--model", tiny_model_folder])


def test_demo_command_compares_with_random(tmp_path, tiny_model_folder, capsys):
    summary = cli.run_demo(["--model", tiny_model_folder, "--rows_per_domain", "4", "--target_rows", "2",
                            "--demo_budget", "4", "--output", str(tmp_path / "demo"), *FAST_FLAGS])
    assert set(summary) == {"influence_distillation", "random"}
    assert (tmp_path / "demo" / "influence_distillation" / "selected.jsonl").exists()
    assert "Share of the selection from the target's domain" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_network_push_and_predict(tmp_path, local_hub, capsys):
    from hf_influence.demo import demo_pool, demo_target

    demo_pool(10, seed=0).to_json(tmp_path / "pool.jsonl")
    demo_target("math", 6, seed=1).to_json(tmp_path / "target.jsonl")
    data = ["--pool", str(tmp_path / "pool.jsonl"), "--target", str(tmp_path / "target.jsonl")]
    run = tmp_path / "nn"
    report = cli.run_fit_network([*data, "--output", str(run), "--oracle", "delift_se", "--block_fraction", "0.5",
                                  "--min_block_rows", "8", "--evaluation_fraction", "0.3", "--network_epochs", "3",
                                  "--show_progress", "false"])
    assert report["training"]["block_rows"] == 20 and "Q4" in report["evaluation"]
    assert (run / "network" / "model.safetensors").exists() and (run / "evaluation_pairs.safetensors").exists()
    # The folder's card is the real one, and shows the PNG saved beside it.
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "network" / "README.md")
    assert card.data.library_name == "hf-influence" and "predicted_vs_true.png" in card.text
    assert card.data.eval_results and card.data.eval_results[0].metric_type == "spearmanr"
    assert (run / "network" / "predicted_vs_true.png").read_bytes().startswith(b"\x89PNG")
    repo_id = f"{local_hub.user}/cli-network"
    cli.run_push(["--network", str(run), "--repo_id", repo_id, "--license", "apache-2.0"])
    cli.run_push(["--scores", str(run / "scores"), "--repo_id", f"{local_hub.user}/cli-scores",
                  "--config_name", "math", "--license", "odc-by"])
    assert ModelCard.load(repo_id).data.license == "apache-2.0"
    from huggingface_hub import DatasetCard

    assert DatasetCard.load(f"{local_hub.user}/cli-scores", repo_type="dataset").data.license == "odc-by"
    predicted = cli.run_predict(["--network", repo_id, *data, "--budget", "5", "--output", str(tmp_path / "pred")])
    assert predicted["selected_rows"] == 5
    assert len((tmp_path / "pred" / "selected.jsonl").read_text().splitlines()) == 5
    assert "pushed to" in capsys.readouterr().out


def test_fit_network_on_a_block_with_no_unseen_pair_saves_a_card_without_a_plot(tmp_path):
    # 16 rows, evaluation_fraction 0.25: every evaluated row is in the block, so there is no Q4 pair to plot.
    from hf_influence.demo import demo_pool, demo_target

    demo_pool(4, seed=0).to_json(tmp_path / "pool.jsonl")
    demo_target("math", 6, seed=1).to_json(tmp_path / "target.jsonl")
    report = cli.run_fit_network(["--pool", str(tmp_path / "pool.jsonl"), "--target", str(tmp_path / "target.jsonl"),
                                  "--output", str(tmp_path / "nn"), "--oracle", "delift_se", "--evaluation_fraction",
                                  "0.25", "--network_epochs", "2", "--show_progress", "false"])
    assert "Q4" not in report["evaluation"] and (tmp_path / "nn" / "network" / "README.md").exists()
    assert not (tmp_path / "nn" / "network" / "predicted_vs_true.png").exists()


def test_train_command_selects_trains_and_measures_the_target_loss(tmp_path, tiny_model_folder, capsys):
    from hf_influence.demo import demo_pool, demo_target

    demo_pool(6, seed=0).to_json(tmp_path / "pool.jsonl")  # 24 chat rows, 4 domains
    demo_target("math", 3, seed=1).to_json(tmp_path / "target.jsonl")
    demo_target("math", 4, seed=2).to_json(tmp_path / "held_out.jsonl")
    config = tmp_path / "train.yaml"
    config.write_text("influence_options:\n  num_landmarks: 6\n  response_column: solution\n"
                      + "".join(f"  {flag.lstrip('-')}: {value}\n" for flag, value in zip(FAST_FLAGS[::2], FAST_FLAGS[1::2])))
    output = tmp_path / "trained"
    summary = cli.run_train(["--config", str(config), "--model", tiny_model_folder, "--pool", str(tmp_path / "pool.jsonl"),
                             "--target", str(tmp_path / "target.jsonl"), "--eval_target", str(tmp_path / "held_out.jsonl"),
                             "--influence_budget", "6", "--max_steps", "3", "--per_device_train_batch_size", "2",
                             "--learning_rate", "1e-2", "--lora_r", "2", "--output_dir", str(output),
                             "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"])
    assert summary["influence"]["training_rows"] == 6 and summary["global_steps"] == 3
    # The reported losses are the held-out rows' loss of the base model and of the saved adapter, measured again here.
    from peft import PeftModel

    from hf_influence import load_model, target_loss
    from hf_influence.data import load_rows
    from hf_influence.formatting import FormattingConfig

    held_out, formatting = load_rows(str(tmp_path / "held_out.jsonl")), FormattingConfig(max_length=1024)
    base, tokenizer = load_model(tiny_model_folder)
    assert target_loss(base, tokenizer, held_out, formatting) == pytest.approx(summary["target_loss_before"], rel=1e-5)
    trained = PeftModel.from_pretrained(load_model(tiny_model_folder)[0], str(output))
    assert target_loss(trained, tokenizer, held_out, formatting) == pytest.approx(summary["target_loss_after"], rel=1e-5)
    assert summary["target_loss_after"] != summary["target_loss_before"]  # the adapter trained
    assert json.loads((output / "summary.json").read_text())["train_loss"] == pytest.approx(summary["train_loss"])
    assert (output / "adapter_model.safetensors").exists()
    card = __import__("huggingface_hub").ModelCard.load(output / "README.md")
    assert "hf_influence" in card.data.tags and "Model Card for None" not in card.text
    assert "[None]" not in card.text and "2505.19051" in card.text  # names its (local) base model, cites the paper
    out = capsys.readouterr().out
    assert "target loss before" in out and "trained on 6 of 24 pool rows" in out
    with pytest.raises(ValueError, match="needs target_dataset"):
        cli.run_train(["--model", tiny_model_folder, "--pool", str(tmp_path / "pool.jsonl"), "--output_dir",
                       str(tmp_path / "none"), "--report_to", "none"])


def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for name in ("influence_mode", "influence_budget", "influence_options", "pool_sample", "eval_target", "lora_r"):
        assert f"--{name}" in text
    # One usage line naming the command; the trainer's own options before the few hundred inherited from TRL.
    assert text.startswith("usage: hf-influence train [--config FILE.yaml] [options]\n")
    groups = [line for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert groups[-2:] == ["influence selection (InfluenceSFTConfig):",
                           "training (TRL's SFTConfig and transformers' TrainingArguments):"]
    influence = text.split(groups[-2])[1].split(groups[-1])[0]
    assert "--influence_mode" in influence and "--learning_rate" not in influence
    text = " ".join(text.split())  # argparse wraps lines (and may break them at a hyphen: check unhyphenated text)
    assert "Seeded random sample of N pool rows" in text and "Held-out target rows" in text


def test_select_checks_its_output_folder_before_loading_anything(tmp_path, monkeypatch):
    from hf_influence.cli import select as select_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(select_module, "load_cli_model", no_model)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 1 + 1?", "completion": "2"}) + "\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "bad_scores" / "scores").mkdir(parents=True)
    (tmp_path / "bad_scores" / "scores" / "other.bin").write_text("x")
    cases = {"a_file": "is a file", "foreign": r"does not write \(notes.txt\)",
             "bad_scores": "is not a score table", "a_file/below": "cannot be written"}
    for output, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            cli.run_select(["--pool", str(rows), "--target", str(rows), "--budget", "1",
                            "--output", str(tmp_path / output)])
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"  # nothing touched


def test_a_commands_own_refusal_exits_with_code_2_and_one_line(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 1 + 1?", "completion": "2"}) + "\n")
    with pytest.raises(SystemExit) as stop:
        cli.main(["select", "--pool", str(rows), "--target", str(rows), "--budget", "two"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--budget" in err and "'two'" in err


def test_every_library_error_is_an_hf_influence_error():
    from hf_influence.errors import HFInfluenceError
    from hf_influence.formatting import FormattingError
    from hf_influence.extraction.gradients import GradientError
    from hf_influence.optimizer_warmup import WarmupMismatchError
    from hf_influence.optimizers import OptimizerStateError
    from hf_influence.artifacts.scores import ScoreTableError
    from hf_influence.selection.rules import SelectionError
    from hf_influence.extraction.store import IncompleteStoreError, StoreMismatchError

    for error in (FormattingError, GradientError, WarmupMismatchError, OptimizerStateError, ScoreTableError,
                  SelectionError, StoreMismatchError, IncompleteStoreError):
        assert issubclass(error, HFInfluenceError), error
    assert issubclass(FormattingError, ValueError) and issubclass(IncompleteStoreError, RuntimeError)


def test_config_files_are_merged_by_trls_parser(tmp_path, monkeypatch):
    """--config goes through TRL's TrlParser: flags over YAML over defaults, its `env:` mapping exported, the
    `--config=PATH` spelling too; a key no option has is refused naming the file."""
    from hf_influence.cli.arguments import CommandParser, SelectArguments

    monkeypatch.delenv("HF_INFLUENCE_TEST_VAR", raising=False)
    config = tmp_path / "select.yaml"
    config.write_text("env:\n  HF_INFLUENCE_TEST_VAR: from-yaml\nbudget: '7'\nprojection_dim: 64\n")
    for argv in (["--config", str(config), "--projection_dim", "128"], [f"--config={config}", "--projection_dim=128"]):
        select, gradients = parse(argv, (SelectArguments, GradientConfig), "test", command="select")
        assert (select.budget, gradients.projection_dim) == ("7", 128)
    assert os.environ["HF_INFLUENCE_TEST_VAR"] == "from-yaml"
    assert issubclass(CommandParser, __import__("trl").TrlParser)
    config.write_text("budgett: 3\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(config)], (SelectArguments, GradientConfig), "test", command="select")


def test_the_group_report_groups_by_depth_and_prints_the_top_groups(capsys):
    """On a pool of many sources the report stays a screenful: --group_depth merges "family/task" sources into
    their family, --top prints the leading groups and sums the rest in one line; the shares still add up."""
    from datasets import Dataset

    from hf_influence.cli.select import group_shares, print_report

    sources = [f"family{i % 3}/task{i}" for i in range(30)]
    pool = Dataset.from_dict({"source": sources})
    selected = pool.select([0, 3, 6, 1])
    assert group_shares(pool, "source", 1) == pytest.approx({"family0": 1 / 3, "family1": 1 / 3, "family2": 1 / 3})
    assert len(group_shares(pool, "source")) == 30
    report = {"method": "m", "pool_rows": 30, "target_rows": 1, "selected_rows": 4, "seconds": {"total": 1.0},
              "pool_share": group_shares(pool, "source"), "selected_share": group_shares(selected, "source")}
    print_report(report, top=3)
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if "pool share" in line)) + 1:]
    assert len(table) == 4 and table[-1].split()[:3] == ["(27", "other", "groups)"]
    assert [line.split()[0] for line in table[:3]] == ["family0/task0", "family0/task3", "family0/task6"]
    assert float(table[-1].split()[3]) == pytest.approx(27 / 30, abs=1e-3)  # the rest's pool share
    assert float(table[-1].split()[4]) == pytest.approx(0.25, abs=1e-3)  # and its selected share


def test_model_init_kwargs_load_the_cli_model_beside_its_flags(tiny_model_folder, monkeypatch):
    """--model_init_kwargs gives the command's own model load the API's loading options (it used to reach the run
    with an already-loaded model and be refused); a flag and the JSON saying the same thing agree."""
    from hf_influence.cli import arguments

    loads = []
    monkeypatch.setattr(arguments, "load_model", lambda name, **kwargs: loads.append((name, kwargs)))
    args = arguments.ModelArguments(model=tiny_model_folder)
    arguments.load_cli_model(args, {"dtype": "bfloat16", "attn_implementation": "eager"})
    arguments.load_cli_model(arguments.ModelArguments(model=tiny_model_folder, dtype="bfloat16"), {"dtype": "bfloat16"})
    assert [kwargs["dtype"] for _, kwargs in loads] == ["bfloat16", "bfloat16"]  # load_model reads the name
    assert loads[0][1]["attn_implementation"] == "eager" and loads[0][1]["device"] == "cpu"


@pytest.mark.slow
def test_the_console_script_exits_0_after_a_successful_command(tmp_path):
    """The installed `hf-influence` runs `sys.exit(main())`: main returns None, so a finished command exits 0
    without printing its result dict (it used to exit 1 with the report on stderr)."""
    import subprocess
    import sys

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(4)))
    script = "import sys; from hf_influence.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", script, "select", "--pool", str(rows), "--target", str(rows),
                           "--budget", "2", "--method", "random", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'method': 'random'" not in done.stderr
    assert len((tmp_path / "out" / "selected.jsonl").read_text().splitlines()) == 2


def test_select_help_shows_the_shared_groups_and_the_chosen_methods_own(capsys, tmp_path):
    """PEFT's pattern on the command line: --method (flag or --config YAML) picks which method group --help
    shows beside the shared ones, and another method's flag is refused naming the method it belongs to."""
    def groups(*argv):
        with pytest.raises(SystemExit):
            cli.main(["select", *argv, "--help"])
        return capsys.readouterr().out

    default = groups()
    assert "landmark Influence Distillation (InfluenceDistillationConfig)" in default and "--num_landmarks" in default
    less = groups("--method", "less")
    assert "selection (SelectionConfig)" in less and "warm-up (WarmupConfig)" in less
    assert "InfluenceDistillation" not in less and "--num_landmarks" not in less
    (tmp_path / "less.yaml").write_text("method: less\n")
    from_yaml = groups("--config", str(tmp_path / "less.yaml"))
    assert "(default: less)" in from_yaml and "InfluenceDistillation" not in from_yaml
    nn_cift = groups("--method", "nn_cift", "--oracle", "influence_distillation_exact")
    assert "NN-CIFT (NNCIFTConfig)" in nn_cift and "(InfluenceDistillationExactConfig)" in nn_cift
    with pytest.raises(SystemExit) as stop:
        cli.main(["select", "--method", "less", "--num_landmarks", "8", "--pool", "p.jsonl", "--target", "t.jsonl"])
    assert stop.value.code == 2
    assert "'num_landmarks' is an option of InfluenceDistillationConfig" in capsys.readouterr().err
