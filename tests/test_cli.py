"""The CLI: option help from the config docstrings, YAML defaults under flags, and a gradients run."""

import json

import pytest

from hf_influence import cli
from hf_influence.gradients import GradientConfig
from hf_influence.testing import tiny_causal_lm


def test_every_config_field_has_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gradients", "--help"])
    text = capsys.readouterr().out
    for field in GradientConfig.__dataclass_fields__:
        assert f"--{field}" in text
    assert "output dimension k of the projection" in text and "adapter rank" in text


def test_yaml_defaults_and_flag_override(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("projection_dim: 128\nseed: 5\n")
    (parsed,) = cli._parse(["--config", str(config), "--seed", "9"], (GradientConfig,), "test")
    assert parsed.projection_dim == 128 and parsed.seed == 9
    with pytest.raises(SystemExit):
        cli._parse(["--no_such_option", "1"], (GradientConfig,), "test")


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
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cli.main(["gradients", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "missing.jsonl")])
