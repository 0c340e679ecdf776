"""Selecting with a pretrained InfluenceNetwork: pulled from the loopback Hub by repo id, applied to a pool and
targets it never saw, without any oracle call; the network's measured figures shown to the user; the encoder, its
revision and the text format checked."""

import json
import logging

import datasets
import hub_server
import pytest
import torch

from hf_influence import cli, load_network, network_summary, select_with_network
from hf_influence.demo import demo_pool, demo_target
from hf_influence.networks.encoders import encode_rows, load_encoder
from hf_influence.artifacts.hub import push_influence_network
from hf_influence.networks.network import InfluenceNetwork
from hf_influence.networks.nn_cift_pipeline import NNCIFTConfig, nn_cift
from hf_influence.networks.oracles import Oracle
from hf_influence.selection.rules import facility_location, select_indices
from hf_influence.selection.streaming import predict_scores

local_hub = hub_server.local_hub


def _targets(domains, rows, seed):
    target = datasets.concatenate_datasets([demo_target(domain, rows, seed=seed) for domain in domains])
    return target.rename_column("answer", "completion").remove_columns(["solution"])


@pytest.fixture(scope="module")
def fitted():
    """A DELIFT-SE network fitted on one pool and three target domains, with its Q1..Q4 figures."""
    config = NNCIFTConfig(oracle="delift_se", block_fraction=0.4, min_block_rows=8, network_epochs=200,
                          network_learning_rate=3e-3, network_patience=20, evaluation_fraction=0.4)
    return nn_cift(demo_pool(20, seed=0), _targets(("math", "code", "qa"), 4, seed=1), config, show_progress=False)


@pytest.fixture
def no_oracle(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a pretrained network's selection called an oracle")

    monkeypatch.setattr(Oracle, "compute_block", refuse)


@pytest.mark.slow
def test_pull_from_the_hub_and_select_from_a_new_pool_and_new_targets(local_hub, fitted, no_oracle, caplog):
    repo_id = f"{local_hub.user}/nn-cift-delift-se"
    push_influence_network(fitted.network, repo_id, training={"block_rows": 32, "block_columns": 5,
                                                              "block_fraction": 0.4},
                           evaluation=fitted.evaluation, plot=fitted.evaluation_pairs)
    # A pool of other rows and targets of a domain the network never saw (classification).
    pool, target = demo_pool(12, seed=7), _targets(("classification", "math"), 3, seed=9)
    with caplog.at_level(logging.WARNING, logger="hf_influence.networks.pretrained"):
        selected, table = select_with_network(pool, target, repo_id, budget=6, show_progress=False,
                                              return_scores=True)
    # The user is told what the network is and how it did on unseen rows and targets.
    q4 = fitted.network.metrics["Q4"]
    assert f"Spearman {q4['spearman']:.3f}" in caplog.text and "delift_se" in caplog.text
    # It is the network's prediction from the recorded encoder, selected by DELIFT's rule.
    encoder = load_encoder(fitted.network.embedding_model)
    expected_scores = predict_scores(encode_rows(pool, encoder, show_progress=False), fitted.network,
                                     encode_rows(target, encoder, show_progress=False))
    torch.testing.assert_close(table.to_matrix()[0], expected_scores)
    assert table.provenance["selection"] == "facility_location"
    assert selected["id"] == pool.select(facility_location(expected_scores, 6).tolist())["id"]
    # A streaming rule streams (no score table) and picks what the table path picks.
    streamed = select_with_network(pool, target, repo_id, budget=6, selection="round_robin", show_progress=False)
    assert streamed["id"] == pool.select(select_indices(expected_scores, 6, rule="round_robin").tolist())["id"]


def test_predict_command_prints_the_networks_figures(local_hub, fitted, no_oracle, tmp_path, capsys):
    repo_id = f"{local_hub.user}/nn-cift-cli"
    push_influence_network(fitted.network, repo_id, training={"block_rows": 32, "block_columns": 5,
                                                              "block_fraction": 0.4}, evaluation=fitted.evaluation)
    pool_file, target_file = tmp_path / "pool.jsonl", tmp_path / "target.jsonl"
    demo_pool(6, seed=3).to_json(str(pool_file))
    _targets(("qa",), 3, seed=4).to_json(str(target_file))
    report = cli.run_predict(["--network", repo_id, "--pool", str(pool_file), "--target", str(target_file),
                       "--budget", "5", "--output", str(tmp_path / "out"), "--show_progress", "false"])
    out = capsys.readouterr().out
    assert "Measured on" in out and f"{fitted.network.metrics['Q4']['mse']:.4f}" in out
    assert report["network_q4"]["spearman"] == fitted.network.metrics["Q4"]["spearman"]
    assert len((tmp_path / "out" / "selected.jsonl").read_text().splitlines()) == 5
    assert json.loads((tmp_path / "out" / "report.json").read_text())["selection"] == "facility_location"


def test_a_network_is_refused_for_other_texts_or_another_encoder(fitted, tmp_path, caplog):
    pool, target = demo_pool(3, seed=2), _targets(("qa",), 2, seed=2)
    other_text = InfluenceNetwork(**{**fitted.network.config, "text_format": "prompt_newline_response_v1"})
    with pytest.raises(ValueError, match="prompt_newline_response_v1"):
        select_with_network(pool, target, other_text, budget=2, show_progress=False)
    other_encoder = InfluenceNetwork(**{**fitted.network.config, "embedding_model": "someone/other-encoder"})
    other_encoder.load_state_dict(fitted.network.state_dict())
    with pytest.raises(ValueError, match="someone/other-encoder"):
        select_with_network(pool, target, other_encoder, budget=2, encoder=load_encoder(), show_progress=False)
    # Another revision of the same encoder may hold other weights: said, not refused.
    other_revision = InfluenceNetwork(**{**fitted.network.config, "embedding_revision": "0123abc"})
    other_revision.load_state_dict(fitted.network.state_dict())
    with caplog.at_level(logging.WARNING, logger="hf_influence.networks.pretrained"):
        select_with_network(pool, target, other_revision, budget=2, show_progress=False)
    assert "0123abc" in caplog.text


def test_load_network_names_a_missing_folder_and_reads_fit_network_outputs(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        load_network(str(tmp_path / "missing-folder"))
    fitted.network.save_pretrained(tmp_path / "run" / "network")
    assert load_network(tmp_path / "run").config == fitted.network.config


def test_a_fit_folder_is_written_and_read_by_one_class(fitted, tmp_path):
    """FitFolder writes what fit-network leaves and reads it back for load_network, predict and push; a second
    write replaces the first whole (nothing of it is left)."""
    from hf_influence.artifacts.fit_folder import FitFolder

    pool, target = demo_pool(20, seed=0), _targets(("math", "code", "qa"), 4, seed=1)
    table = fitted.score_table(pool, target, NNCIFTConfig(oracle="delift_se"))
    report = {"oracle": "delift_se", "training": {"block_rows": len(fitted.block_rows)}}
    folder = FitFolder.write(tmp_path / "fit", fitted.network, table, report, fitted.evaluation_pairs)
    assert sorted(p.name for p in folder.path.iterdir()) == sorted(FitFolder.OUTPUTS)
    assert folder.report() == report and load_network(folder.path).config == fitted.network.config
    predicted, true = folder.evaluation_pairs()
    assert torch.equal(predicted, fitted.evaluation_pairs[0]) and torch.equal(true, fitted.evaluation_pairs[1])
    assert FitFolder.network_path(tmp_path / "fit") == tmp_path / "fit" / "network"
    FitFolder.write(tmp_path / "fit", fitted.network, table, {}, None)
    assert folder.evaluation_pairs() is None and folder.report() == {}
    fitted.network.save_pretrained(tmp_path / "plain")  # a plain saved network is its own network path
    assert FitFolder.network_path(tmp_path / "plain") == tmp_path / "plain"
    assert FitFolder(tmp_path / "plain").report() == {} and FitFolder(tmp_path / "plain").evaluation_pairs() is None


def test_summary_warns_when_a_network_carries_no_figures():
    text = network_summary(InfluenceNetwork(embedding_dim=4, oracle="less", label_min=0.0, label_max=1.0))
    assert "no measured figures" in text and "'less'" in text


def test_save_pretrained_writes_the_networks_real_card(fitted, tmp_path):
    from huggingface_hub import ModelCard

    fitted.network.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert {"hf_influence", "nn-cift"} <= set(card.data.tags)
    q4 = fitted.network.metrics["Q4"]
    assert "| Q4 |" in card.text and f"{q4['mse']:.4f}" in card.text and "select_with_network" in card.text
    assert "delift_se" in card.text and fitted.network.embedding_model in card.text
    # The measured generalisation is model-index metadata; the encoder links to its Hub page; no made-up licence.
    spearman = next(result for result in card.data.eval_results if result.metric_type == "spearmanr")
    assert spearman.metric_value == pytest.approx(q4["spearman"])
    assert f"(https://huggingface.co/{fitted.network.embedding_model})" in card.text
    assert card.data.license is None
    fitted.network.save_pretrained(tmp_path / "licensed", model_card_kwargs={"license": "mit"})
    assert ModelCard.load(tmp_path / "licensed" / "README.md").data.license == "mit"
    InfluenceNetwork(embedding_dim=4, label_min=0.0, label_max=1.0).save_pretrained(tmp_path / "bare")  # no ids


def test_predict_refuses_options_it_does_not_use(tmp_path, capsys):
    for flags in (["--method", "random"], ["--repo_id", "me/x"], ["--private", "true"], ["--work_dir", "w"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.run_predict(["--network", "x", "--pool", "p.jsonl", "--target", "t.jsonl", *flags])
        assert exit_info.value.code == 2
        assert f"does not use {flags[0]}" in capsys.readouterr().err


def test_an_lm_encoder_network_reads_the_valuation_models_hidden_states():
    from hf_influence.formatting import FormattingConfig, format_dataset
    from hf_influence.rds_embeddings import LM_TEXT_FORMAT, lm_pooled_embeddings
    from hf_influence.testing import lora_model, tiny_causal_lm

    model, tokenizer = lora_model(seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an adapter that changes the hidden states: the encoder must switch it off
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    pool, target = demo_pool(8, seed=0), _targets(("math", "qa"), 3, seed=1)
    config = NNCIFTConfig(oracle="delift_se", encoder="lm", block_fraction=0.4, min_block_rows=8, network_epochs=3)
    result = nn_cift(pool, target, config, model=model, tokenizer=tokenizer, show_progress=False)
    formatted = format_dataset(pool, tokenizer, FormattingConfig(), show_progress=False).dataset
    with model.disable_adapter():
        base = lm_pooled_embeddings(model, formatted, pad_token_id=tokenizer.pad_token_id, show_progress=False)
    adapted = lm_pooled_embeddings(model, formatted, pad_token_id=tokenizer.pad_token_id, show_progress=False)
    assert not torch.allclose(base, adapted)
    torch.testing.assert_close(result.pool_embeddings, base)
    assert result.network.embedding_model.startswith("lm:") and result.network.text_format == LM_TEXT_FORMAT
    # Selecting with it runs the same model on the new rows (no oracle), and refuses another model.
    selected, table = select_with_network(pool, target, result.network, budget=4, model=model, tokenizer=tokenizer,
                                          selection="round_robin", show_progress=False, return_scores=True)
    expected = predict_scores(result.pool_embeddings, result.network, result.target_embeddings)
    torch.testing.assert_close(table.to_matrix()[0], expected)
    assert selected["id"] == pool.select(select_indices(expected, 4, rule="round_robin").tolist())["id"]
    other, other_tokenizer = tiny_causal_lm("qwen2", seed=0)
    with pytest.raises(ValueError, match="lm:"):
        select_with_network(pool, target, result.network, budget=4, model=other, tokenizer=other_tokenizer,
                            show_progress=False)


def test_a_group_column_asked_for_by_name_must_exist(fitted, tmp_path, capsys):
    pool_file, target_file = tmp_path / "pool.jsonl", tmp_path / "target.jsonl"
    demo_pool(3, seed=3).to_json(str(pool_file))
    _targets(("qa",), 2, seed=4).to_json(str(target_file))
    fitted.network.save_pretrained(tmp_path / "net")
    with pytest.raises(SystemExit, match="'domain' is not a column of the pool"):
        cli.run_predict(["--network", str(tmp_path / "net"), "--pool", str(pool_file), "--target", str(target_file),
                         "--budget", "2", "--output", str(tmp_path / "out"), "--group_column", "domain"])


def test_an_lm_encoder_can_read_the_last_token_of_the_first_blocks():
    """encoder="lm" with lm_pooling="last" and lm_blocks=1: each row's state after the first decoder block (through
    the final norm) at its last token (brute force: a one-block copy of the model, row by row, no padding); the
    network records both, and selecting with it embeds new rows the same way."""
    import copy

    from hf_influence.formatting import FormattingConfig, format_dataset
    from hf_influence.rds_embeddings import parse_lm_encoder_id
    from hf_influence.testing import tiny_causal_lm

    model, tokenizer = tiny_causal_lm(seed=0, num_layers=2)
    pool, target = demo_pool(8, seed=0), _targets(("math", "qa"), 3, seed=1)
    config = NNCIFTConfig(oracle="delift_se", encoder="lm", lm_pooling="last", lm_blocks=1, block_fraction=0.4,
                          min_block_rows=8, network_epochs=3)
    result = nn_cift(pool, target, config, model=model, tokenizer=tokenizer, show_progress=False)
    one_block = copy.deepcopy(model)
    one_block.model.layers = one_block.model.layers[:1]
    formatted = format_dataset(pool, tokenizer, FormattingConfig(), show_progress=False).dataset
    with torch.no_grad():
        expected = torch.stack([torch.nn.functional.normalize(one_block.model(
            input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0, -1], dim=0) for row in formatted])
    torch.testing.assert_close(result.pool_embeddings, expected, rtol=1e-4, atol=1e-5)
    assert parse_lm_encoder_id(result.network.embedding_model)[1:] == ("last", 1)
    selected, table = select_with_network(pool, target, result.network, budget=4, model=model, tokenizer=tokenizer,
                                          selection="round_robin", show_progress=False, return_scores=True)
    torch.testing.assert_close(table.to_matrix()[0], predict_scores(result.pool_embeddings, result.network,
                                                                    result.target_embeddings))
    result.network.embedding_model += ",layer=3"  # an encoder option this version does not know
    with pytest.raises(ValueError, match="update hf-influence"):
        select_with_network(pool, target, result.network, budget=4, model=model, tokenizer=tokenizer,
                            show_progress=False)
    with pytest.raises(ValueError, match="lm_pooling"):
        NNCIFTConfig(lm_pooling="max")
