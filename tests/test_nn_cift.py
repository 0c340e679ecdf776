"""NN-CIFT end to end: oracle on a block, InfluenceNetwork fit and predict, selection, and the Hub round trip."""

from pathlib import Path

import datasets
import hub_server
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from hf_influence import select_by_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.artifacts.hub import push_influence_network
from hf_influence.networks.network import InfluenceNetwork
from hf_influence.networks.nn_cift_pipeline import NNCIFTConfig, block_indices, nn_cift
from hf_influence.networks.oracles import DeliftSEOracle
from hf_influence.selection.rules import SelectionError
from hf_influence.extraction.store import fingerprint_dataset
from hf_influence.testing import lora_model

local_hub = hub_server.local_hub


@pytest.fixture(scope="module")
def rows():
    pool = demo_pool(20, seed=0)  # 80 rows, 4 domains
    target = datasets.concatenate_datasets([demo_target(domain, 4, seed=1) for domain in ("math", "code", "qa")])
    return pool, target.rename_column("answer", "completion").remove_columns(["solution"])


@pytest.fixture(scope="module")
def distilled(rows):
    pool, target = rows
    config = NNCIFTConfig(oracle="delift_se", block_fraction=0.4, min_block_rows=8, network_epochs=200,
                          network_learning_rate=3e-3, network_patience=20, evaluation_fraction=0.4)
    return nn_cift(pool, target, config, show_progress=False)


@pytest.mark.slow
def test_block_keeps_the_oracle_values_and_the_rest_is_predicted(rows, distilled):
    pool, target = rows
    assert distilled.scores.shape == (len(pool), len(target))
    assert len(distilled.block_rows) == 32 and len(distilled.block_columns) == 5
    exact = DeliftSEOracle(show_progress=False).compute_block(pool, target)
    block = distilled.scores[distilled.block_rows.unsqueeze(1), distilled.block_columns.unsqueeze(0)]
    torch.testing.assert_close(block, exact[distilled.block_rows][:, distilled.block_columns])
    torch.testing.assert_close(distilled.block_labels, block)
    assert set(distilled.seconds) == {"embed", "oracle", "fit", "predict", "evaluation"}


@pytest.mark.slow
def test_column_normalised_network_keeps_the_block_in_standard_units(rows):
    from hf_influence.networks.network import standardize_columns

    pool, target = rows
    config = NNCIFTConfig(oracle="delift_se", block_fraction=0.4, min_block_rows=8, network_epochs=5,
                          network_label_normalization="column", network_interaction_rank=4)
    result = nn_cift(pool, target, config, show_progress=False)
    assert (result.network.label_normalization, result.network.interaction_rank) == ("column", 4)
    assert result.network.text_format and result.network.embedding_revision
    exact = DeliftSEOracle(show_progress=False).compute_block(pool.select(result.block_rows.tolist()),
                                                               target.select(result.block_columns.tolist()))
    block = result.scores[result.block_rows.unsqueeze(1), result.block_columns.unsqueeze(0)]
    torch.testing.assert_close(block, standardize_columns(exact))
    assert block.mean(0).abs().max() < 1e-5


def test_network_learns_the_embedding_oracle(distilled):
    q4 = distilled.evaluation["Q4"]
    print({name: {key: round(value, 3) for key, value in quadrant.items() if isinstance(value, float)}
           for name, quadrant in distilled.evaluation.items() if name.startswith("Q")})
    assert q4["mse"] < 0.5 * q4["mean_baseline_mse"]
    assert q4["spearman"] > 0.6
    predicted, true = distilled.evaluation_pairs
    assert predicted.shape == true.shape and predicted.numel() > 0
    # The evaluation block: training rows and columns first, then fresh ones; its unseen corner is Q4.
    rows, columns, labels = distilled.evaluation_block
    seen_rows, seen_columns = len(distilled.block_rows), len(distilled.block_columns)
    assert torch.equal(rows[:seen_rows], distilled.block_rows) and torch.equal(columns[:seen_columns],
                                                                              distilled.block_columns)
    assert not set(rows[seen_rows:].tolist()) & set(distilled.block_rows.tolist())
    assert torch.equal(labels[seen_rows:, seen_columns:].flatten(), true)


@pytest.mark.slow
def test_work_dir_keeps_the_sentence_embeddings(rows, tmp_path):
    pool, target = rows
    config = NNCIFTConfig(oracle="delift_se", block_fraction=0.4, min_block_rows=8, network_epochs=5)
    first = nn_cift(pool, target, config, show_progress=False, work_dir=str(tmp_path))
    stores = tmp_path / "sentence_embeddings"
    target_store = stores / f"target-{fingerprint_dataset(target)[:16]}"
    assert (stores / "pool" / "manifest.json").is_file() and (target_store / "manifest.json").is_file()
    written = {path: path.stat().st_mtime_ns for path in stores.rglob("*")
               if path.is_file() and path.name != "manifest.json"}
    again = nn_cift(pool, target, config, show_progress=False, work_dir=str(tmp_path))
    assert {path: path.stat().st_mtime_ns for path in written} == written  # read back, not encoded again
    assert torch.equal(again.pool_embeddings, first.pool_embeddings) and torch.equal(again.scores, first.scores)
    # Another target on the same work_dir: its own store, the pool's read back (it was refused before).
    other = target.select(range(4))
    second = nn_cift(pool, other, config, show_progress=False, work_dir=str(tmp_path))
    assert torch.equal(second.pool_embeddings, first.pool_embeddings)
    assert {path: path.stat().st_mtime_ns for path in written} == written
    assert len(list(stores.glob("target-*"))) == 2


def test_block_indices_are_seeded_and_bounded():
    config = NNCIFTConfig(block_fraction=0.05, min_block_rows=10, nn_cift_seed=3)
    rows, columns = block_indices(1000, 40, config)
    assert len(rows) == 50 and len(columns) == 2 and torch.equal(rows, rows.sort().values)
    again, _ = block_indices(1000, 40, config)
    assert torch.equal(rows, again)
    assert len(block_indices(30, 1, config)[0]) == 10


@pytest.mark.slow
def test_select_by_influence_with_nn_cift(rows):
    pool, target = rows
    model, tokenizer = lora_model(seed=0)
    selected, table = select_by_influence(
        pool, target, model=model, tokenizer=tokenizer, budget=6, method="nn_cift", return_scores=True,
        oracle="less", block_fraction=0.3, min_block_rows=8, optimizer_state="gd", projection_dim=256,
        show_progress=False, network_epochs=5)
    assert len(set(selected["id"])) == 6
    details = table.provenance["details"]
    assert details["block_rows"] == 24 and set(details["seconds"]) >= {"embed", "oracle", "fit", "predict"}
    assert int(table.landmark_mask.sum()) == 24


@pytest.mark.parametrize("oracle, rule", [("delift_se", "facility_location"), ("selectit", "mean_top_k"),
                                          ("less", "less"), ("influence_distillation_exact", "round_robin")])
@pytest.mark.slow
def test_each_oracle_selects_by_its_papers_rule(rows, oracle, rule):
    from hf_influence.methods.nn_cift import nn_cift_rule
    from hf_influence.options import split_options

    assert nn_cift_rule(split_options({"method": "nn_cift", "oracle": oracle})) == rule
    if oracle != "delift_se":  # one end-to-end run is enough: the rule is recorded with the table
        return
    pool, target = rows
    model, tokenizer = lora_model(seed=0)
    selected, table = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=6, method="nn_cift",
                                          oracle=oracle, block_fraction=0.3, min_block_rows=8, network_epochs=5,
                                          show_progress=False, return_scores=True)
    assert table.provenance["selection"] == rule
    scores = table.to_matrix()[0]
    from hf_influence.selection.rules import facility_location

    assert selected["id"] == pool.select(facility_location(scores, 6).tolist())["id"]


@pytest.mark.slow
def test_unseen_only_selection_leaves_the_block_rows_out(rows):
    pool, target = rows
    model, tokenizer = lora_model(seed=0)
    options = dict(model=model, tokenizer=tokenizer, budget=6, method="nn_cift", oracle="delift_se",
                   block_fraction=0.3, min_block_rows=8, network_epochs=5, show_progress=False, return_scores=True,
                   selection="round_robin")
    everything, table = select_by_influence(pool, target, **options)
    unseen, _ = select_by_influence(pool, target, select_unseen_only=True, **options)
    block_ids = set(pool.select(table.landmark_mask.nonzero().flatten().tolist())["id"])
    assert block_ids & set(everything["id"])  # the block's exact scores are the pool's best here ...
    assert not block_ids & set(unseen["id"]) and len(set(unseen["id"])) == 6  # ... and are left out on request
    # The unseen-only pick is the same rule on the matrix without the block's rows.
    scores, row_ids, _ = table.to_matrix()
    keep = (~table.landmark_mask).nonzero().flatten()
    from hf_influence.selection.rules import select_indices

    expected = keep[select_indices(scores[keep], 6, rule="round_robin", seed=0)]
    assert unseen["id"] == pool.select([row_ids[i] for i in expected.tolist()])["id"]
    with pytest.raises(SelectionError, match="selectable pool rows"):
        select_by_influence(pool, target, select_unseen_only=True, **{**options, "budget": 60})


@pytest.mark.parametrize("oracle", ["delift_se", "selectit"])  # pairwise and pointwise networks
@pytest.mark.slow
def test_streamed_nn_cift_selection_equals_the_score_table_selection(rows, monkeypatch, oracle):
    """Without return_scores, method="nn_cift" predicts chunk by chunk while selecting (the oracle block keeps
    its values): the same rows in the same order as the [n, m] table path, which is never built."""
    import importlib

    from hf_influence.selection.streaming import ScoreStream

    method_module = importlib.import_module("hf_influence.methods.nn_cift")

    pool, target = rows
    model, tokenizer = lora_model(seed=0)
    options = {"budget": 7, "method": "nn_cift", "oracle": oracle, "block_fraction": 0.3, "min_block_rows": 8,
               "network_epochs": 5, "show_progress": False, "selection_seed": 2, "selection": "round_robin"}
    selected, table = select_by_influence(pool, target, model=model, tokenizer=tokenizer, return_scores=True,
                                          **options)
    scores = table.to_matrix()[0]
    assert scores.shape == (len(pool), 1 if oracle == "selectit" else len(target))

    def no_matrix(*args, **kwargs):
        raise AssertionError("the streamed selection built the [n, m] score matrix")

    def scores_left_to_the_stream(*args, **kwargs):
        result = nn_cift(*args, **kwargs)
        assert kwargs["predict"] is False and result.scores is None
        return result

    monkeypatch.setattr(ScoreStream, "scores", no_matrix)
    monkeypatch.setattr(method_module, "nn_cift", scores_left_to_the_stream)
    streamed = select_by_influence(pool, target, model=model, tokenizer=tokenizer, **options)
    assert streamed["id"] == selected["id"]


def test_network_push_and_pull_through_the_hub(local_hub, distilled):
    repo_id = f"{local_hub.user}/delift-se-minilm"
    push_influence_network(distilled.network, repo_id, training={"block_rows": 32, "block_columns": 5,
                                                                 "block_fraction": 0.4},
                           evaluation=distilled.evaluation, plot=distilled.evaluation_pairs)
    loaded = InfluenceNetwork.from_pretrained(repo_id)
    assert loaded.config == distilled.network.config
    torch.testing.assert_close(loaded.predict(distilled.pool_embeddings, distilled.target_embeddings),
                               distilled.network.predict(distilled.pool_embeddings, distilled.target_embeddings))
    card = ModelCard.load(repo_id)
    assert {"hf_influence", "nn-cift"} <= set(card.data.tags)
    for text in ("delift_se", "sentence-transformers/all-MiniLM-L6-v2", "| Q4 |", "predicted_vs_true.png",
                 "Valid only for the same oracle"):
        assert text in card.text
    card.validate()
    assert "predicted_vs_true.png" in HfApi().list_repo_files(repo_id)
    png = Path(hf_hub_download(repo_id, "predicted_vs_true.png")).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000  # drawn by matplotlib, not a stub
    with pytest.raises(ValueError, match="dimension|embedding"):
        loaded.predict(torch.randn(3, 17), torch.randn(2, 17))


def test_score_table_of_a_result(rows, distilled):
    pool, target = rows
    table = distilled.score_table(pool, target, NNCIFTConfig(oracle="delift_se"), details={"note": 1})
    scores, row_ids, targets = table.to_matrix()
    assert row_ids == list(range(len(pool))) and targets == [str(i) for i in target["id"]]
    torch.testing.assert_close(scores, distilled.scores.to(scores.dtype))
    assert torch.equal(table.landmark_mask.nonzero().flatten().sort().values, distilled.block_rows.sort().values)
    assert table.provenance["oracle"] == "delift_se" and table.provenance["details"] == {"note": 1}


@pytest.mark.slow
def test_a_method_oracle_warms_up_once_on_the_whole_pool(rows):
    """With the warm-up on the whole pool (MethodOracle.prepare), the block is the full-pool run's scores on the
    block's rows and columns: the same warm-up slice and optimizer state, not one warm-up per block."""
    from hf_influence import compute_scores

    pool, target = rows
    model, tokenizer = lora_model(seed=0)
    options = {"projection_dim": 128, "warmup_fraction": 0.25, "warmup_min_steps": 2, "show_progress": False}
    full = compute_scores(pool, target, model=model, tokenizer=tokenizer, method="influence_distillation_exact",
                          **options).output.scores
    config = NNCIFTConfig(oracle="influence_distillation_exact", block_fraction=0.2, min_block_rows=8,
                          network_epochs=2)
    result = nn_cift(pool, target, config, model=model, tokenizer=tokenizer, **options)
    expected = full[result.block_rows][:, result.block_columns]
    torch.testing.assert_close(result.block_labels, expected, atol=1e-5, rtol=1e-4)
    # The user's adapter is as it was (the warm-up restores it; release undoes the oracle's preparation).
    again = compute_scores(pool, target, model=model, tokenizer=tokenizer, method="influence_distillation_exact",
                           **options).output.scores
    torch.testing.assert_close(again, full)


@pytest.mark.slow
def test_artifacts_push_and_load_through_their_own_methods(local_hub, rows, distilled):
    from hf_influence import ScoreTable

    pool, target = rows
    url = distilled.push_to_hub(f"{local_hub.user}/nn-cift-result")
    assert url.endswith("nn-cift-result")
    pulled = InfluenceNetwork.from_pretrained(f"{local_hub.user}/nn-cift-result")
    assert pulled.config == distilled.network.config
    card = ModelCard.load(f"{local_hub.user}/nn-cift-result")
    assert "| Q4 |" in card.text and "predicted_vs_true.png" in card.text
    table = distilled.score_table(pool, target, NNCIFTConfig(oracle="delift_se"))
    table.push_to_hub(f"{local_hub.user}/nn-cift-scores", config_name="demo")
    loaded = ScoreTable.from_pretrained(f"{local_hub.user}/nn-cift-scores", config_name="demo")
    assert loaded.to_matrix()[0].tolist() == table.to_matrix()[0].tolist()
    assert loaded.provenance["pool_rows_digest"] == table.provenance["pool_rows_digest"]
