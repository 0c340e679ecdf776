"""InfluenceNetwork (NN-CIFT): factorised inference against the plain forward, fitting, quadrant evaluation, Hub I/O."""

import json
import math

import hub_server
import pytest
import safetensors.torch
import scipy.stats
import torch
from huggingface_hub import HfApi, ModelCard

from hf_influence.networks import network as network_module
from hf_influence.networks.network import InfluenceNetwork, column_spearman, split_held_out, split_pairs

local_hub = hub_server.local_hub


def _embeddings(rows, dim, generator):
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)


def _synthetic(n=400, m=60, e=8, rank=2, seed=0):
    """A smooth low-rank influence matrix: labels[i, j] = 3 f(e_i) . g(e_j) + 1 with f, g = tanh of random maps."""
    generator = torch.Generator().manual_seed(seed)
    pool, target = _embeddings(n, e, generator), _embeddings(m, e, generator)
    f, g = torch.randn(e, rank, generator=generator), torch.randn(e, rank, generator=generator)
    labels = 3 * torch.tanh(pool @ f) @ torch.tanh(target @ g).T + 1
    return pool, target, labels


def _block(n, m, seed=1):
    """Seeded training block: half the pool rows and half the target columns."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[: n // 2], torch.randperm(m, generator=generator)[: m // 2]


def _brute_force(network, pool, target):
    """The plain forward on every concatenated pair [e_i ; e_j], de-normalised: [n, m] (or [n] pointwise)."""
    scale = network.label_max - network.label_min
    if target is None:
        return network(pool) * scale + network.label_min
    n, m = pool.shape[0], target.shape[0]
    pairs = torch.cat([pool[:, None].expand(n, m, -1), target[None].expand(n, m, -1)], dim=-1)
    return network(pairs.reshape(n * m, -1)).reshape(n, m) * scale + network.label_min


def _fitted_network(**kwargs):
    pool, target, labels = _synthetic(n=60, m=12)
    network = InfluenceNetwork(embedding_dim=8, embedding_model="test/encoder", oracle="influence_distillation",
                               valuation_model="test/lm", **kwargs)
    network.fit(pool[:30], target[:6], labels[:30, :6], epochs=2, lr=1e-3)
    return network, pool, target, labels


@pytest.mark.parametrize(("kind", "interaction_rank"), [("pairwise", 0), ("pointwise", 0), ("pairwise", 5)])
@pytest.mark.parametrize("hidden_sizes", [[100], [32, 16]])
@pytest.mark.parametrize(("chunk_rows", "tile_rows"), [(16384, None), (7, 3), (1, 1), (40, 64)])
def test_factorised_predict_equals_the_plain_forward(kind, interaction_rank, hidden_sizes, chunk_rows, tile_rows,
                                                     monkeypatch):
    n, m, e = 37, 11, 16
    generator = torch.Generator().manual_seed(0)
    pool, target = torch.randn(n, e, generator=generator), torch.randn(m, e, generator=generator)
    network = InfluenceNetwork(kind=kind, embedding_dim=e, hidden_sizes=hidden_sizes, label_min=-2.0, label_max=3.0,
                               interaction_rank=interaction_rank)
    if tile_rows is not None:  # force several tiles per chunk, with a ragged last one
        monkeypatch.setattr(network_module, "TILE_BYTES", tile_rows * hidden_sizes[0] * m * 4)
    target = target if kind == "pairwise" else None
    threads = torch.get_num_threads()
    predicted = network.predict(pool, target, chunk_rows=chunk_rows)
    assert torch.get_num_threads() == threads  # predict's one-thread pinning is undone
    assert predicted.shape == ((n, m) if kind == "pairwise" else (n,))
    torch.testing.assert_close(predicted, _brute_force(network, pool, target).detach(), rtol=1e-5, atol=1e-5)


def test_num_threads_is_applied_inside_and_restored_after(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    pool, target = torch.randn(20, 8, generator=generator), torch.randn(5, 8, generator=generator)
    network = InfluenceNetwork(embedding_dim=8, label_min=0.0, label_max=1.0)
    seen, real_scorer = [], network._pair_scorer

    def recording_scorer(target_block):
        seen.append(torch.get_num_threads())
        return real_scorer(target_block)

    monkeypatch.setattr(network, "_pair_scorer", recording_scorer)
    threads = torch.get_num_threads()
    reference = network.predict(pool, target)
    torch.testing.assert_close(network.predict(pool, target, num_threads=None), reference)
    network.top_candidates(pool, target, k=3, num_threads=2)
    assert seen == [1, threads, 2]
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="num_threads must be >= 1 or None"):
        network.predict(pool, target, num_threads=0)


@pytest.mark.parametrize(("k", "chunk_rows"), [(1, 16384), (5, 3), (5, 8), (50, 7), (50, 50)])
def test_top_candidates_equal_topk_of_the_full_prediction(k, chunk_rows):
    generator = torch.Generator().manual_seed(1)
    pool, target = torch.randn(50, 16, generator=generator), torch.randn(9, 16, generator=generator)
    network = InfluenceNetwork(embedding_dim=16, hidden_sizes=[20], label_min=0.5, label_max=4.0)
    values, indices = network.top_candidates(pool, target, k, chunk_rows=chunk_rows)
    expected = network.predict(pool, target).topk(k, dim=0)
    assert values.shape == indices.shape == (9, k)
    assert torch.equal(indices, expected.indices.T)
    torch.testing.assert_close(values, expected.values.T)


def test_parameter_counts_match_the_paper():
    assert sum(p.numel() for p in InfluenceNetwork(embedding_dim=384).parameters()) == 77_001
    assert sum(p.numel() for p in InfluenceNetwork(embedding_dim=1024).parameters()) == 205_001


@pytest.mark.slow
def test_interaction_term_is_the_bilinear_form_and_learns_a_cosine():
    generator = torch.Generator().manual_seed(0)
    pool, target = _embeddings(300, 8, generator), _embeddings(60, 8, generator)
    network = InfluenceNetwork(embedding_dim=8, hidden_sizes=[4], interaction_rank=3, label_min=0.0, label_max=1.0)
    p, q = network.interaction.detach()
    pairs = torch.cat([pool[:5], target[:5]], dim=1)
    without = network(pairs) - ((pool[:5] @ p.T) * (target[:5] @ q.T)).sum(-1)
    with torch.no_grad():
        network.interaction.zero_()
    torch.testing.assert_close(network(pairs), without.detach())
    assert sum(x.numel() for x in network.parameters()) == 16 * 4 + 4 + 4 + 1 + 2 * 3 * 8
    # An embedding cosine (DELIFT-SE) is a bilinear form: on unseen rows and targets the bilinear network
    # recovers it, where the paper's MLP of the same width ranks it far less well.
    labels = pool @ target.T
    rows, columns = torch.arange(120), torch.arange(20)
    results = {}
    for rank in (0, 8):
        network = InfluenceNetwork(embedding_dim=8, hidden_sizes=[4], interaction_rank=rank)
        network.fit(pool[rows], target[columns], labels[rows][:, columns], lr=1e-2, epochs=60, patience=10)
        results[rank] = network.evaluate(pool, target, labels, rows, columns)["Q4"]
    assert results[8]["spearman"] > 0.95 > results[0]["spearman"] + 0.05
    with pytest.raises(ValueError, match="interaction_rank"):
        InfluenceNetwork(kind="pointwise", embedding_dim=8, interaction_rank=2)


def test_column_normalisation_learns_each_targets_ranking_not_its_scale():
    # Each target scales and shifts one shared row ranking: "column" normalisation removes the per-target
    # scale the network cannot know for an unseen target; predictions are per-target standard units.
    generator = torch.Generator().manual_seed(1)
    pool, target = _embeddings(200, 8, generator), _embeddings(40, 8, generator)
    quality = torch.tanh(pool @ torch.randn(8, generator=generator))
    scale, shift = torch.rand(40, generator=generator) * 10, torch.randn(40, generator=generator) * 5
    labels = quality[:, None] * scale[None, :] + shift[None, :]
    rows, columns = torch.arange(100), torch.arange(20)
    network = InfluenceNetwork(embedding_dim=8, label_normalization="column")
    network.fit(pool[rows], target[columns], labels[rows][:, columns], lr=1e-2, epochs=60, patience=10)
    block = labels[rows][:, columns]
    standard = (block - block.mean(0)) / block.std(0, correction=0)
    assert network.label_min == pytest.approx(standard.min().item(), rel=1e-5)
    q4 = network.evaluate(pool, target, labels, rows, columns)["Q4"]
    assert q4["column_spearman"] > 0.9 and q4["mse"] < 0.2 * q4["mean_baseline_mse"]
    assert network.config["label_normalization"] == "column"
    with pytest.raises(ValueError, match="label_normalization"):
        InfluenceNetwork(embedding_dim=8, label_normalization="rows")


def test_column_spearman_is_the_mean_of_the_columns_spearman():
    generator = torch.Generator().manual_seed(2)
    predicted, true = torch.randn(30, 4, generator=generator), torch.randn(30, 4, generator=generator)
    true[:, 3] = 1.0  # a constant column has no ranking and is left out
    expected = sum(scipy.stats.spearmanr(predicted[:, c], true[:, c]).statistic for c in range(3)) / 3
    assert column_spearman(predicted, true) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(column_spearman(predicted[:1], true[:1]))


def test_fit_learns_low_rank_influence_and_generalises_to_unseen_quadrants():
    pool, target, labels = _synthetic()
    rows, columns = _block(*labels.shape)
    network = InfluenceNetwork(embedding_dim=8)
    history = network.fit(pool[rows], target[columns], labels[rows][:, columns], lr=1e-3)
    assert history["train_pairs"] + history["validation_pairs"] == len(rows) * len(columns)
    assert network.label_min == labels[rows][:, columns].min().item()
    results = network.evaluate(pool, target, labels, rows, columns)
    assert set(results) == {"k", "Q1", "Q2", "Q3", "Q4"}
    q4 = results["Q4"]
    assert (q4["rows"], q4["columns"]) == (200, 30)
    assert q4["mse"] < 0.2 * q4["mean_baseline_mse"] and q4["mse"] < 0.1 * q4["random_baseline_mse"]
    assert q4["spearman"] > 0.8 and abs(q4["random_baseline_spearman"]) < 0.1
    assert q4["topk_overlap"] > 2 * q4["random_baseline_topk_overlap"]
    # The figures travel with the weights, as strict JSON (the undefined mean-baseline Spearman as null).
    assert network.config["metrics"]["Q4"]["mse"] == q4["mse"]
    assert network.config["metrics"]["Q4"]["mean_baseline_spearman"] is None
    json.dumps(network.config, allow_nan=False)


def test_evaluate_assigns_quadrants_and_normalises_with_the_stored_range():
    # Labels = the network's own predictions shifted by a per-quadrant offset (normalised units): each
    # quadrant's MSE is its offset squared, a transposed or mislabelled quadrant would show at once.
    network, pool, target, _ = _fitted_network()
    rows, columns = torch.tensor([0, 5, 9, 40]), torch.tensor([1, 7])
    seen_row, seen_column = torch.zeros(60, 1, dtype=torch.bool), torch.zeros(1, 12, dtype=torch.bool)
    seen_row[rows], seen_column[:, columns] = True, True
    offsets = {"Q1": 0.0, "Q2": 0.1, "Q3": 0.2, "Q4": 0.3}
    offset = torch.where(seen_row, torch.where(seen_column, offsets["Q1"], offsets["Q2"]),
                         torch.where(seen_column, offsets["Q3"], offsets["Q4"]))
    scale = network.label_max - network.label_min
    labels = network.predict(pool, target).double() + offset * scale
    results = network.evaluate(pool, target, labels, rows, columns, k=2)
    for name, value in offsets.items():
        assert results[name]["mse"] == pytest.approx(value**2, abs=1e-6)
        assert results[name]["spearman"] > 0.99 and results[name]["topk_overlap"] == 1.0
    assert (results["Q2"]["rows"], results["Q2"]["columns"], results["Q3"]["rows"]) == (4, 10, 56)
    with pytest.raises(ValueError, match="seen_columns"):
        network.evaluate(pool, target, labels, rows)


def test_pointwise_fit_and_evaluate():
    generator = torch.Generator().manual_seed(3)
    pool = _embeddings(300, 8, generator)
    labels = torch.tanh(pool @ torch.randn(8, generator=generator)) * 5
    rows = torch.arange(150)
    network = InfluenceNetwork(kind="pointwise", embedding_dim=8)
    network.fit(pool[rows], None, labels[rows], lr=1e-2, epochs=100, patience=10)
    results = network.evaluate(pool, None, labels, rows)
    assert set(results) == {"k", "Q1", "Q3"}  # one column, always seen
    assert results["Q3"]["spearman"] > 0.9 and results["Q3"]["mse"] < 0.2 * results["Q3"]["mean_baseline_mse"]


def test_fit_is_deterministic_for_a_seed():
    pool, target, labels = _synthetic(n=60, m=12)

    def fit(construction_seed, seed):
        network = InfluenceNetwork(embedding_dim=8, seed=construction_seed)
        history = network.fit(pool, target, labels, epochs=3, lr=1e-3, seed=seed)
        return network, history

    (first, first_history), (second, second_history) = fit(0, 5), fit(1, 5)
    assert first_history == second_history and first.seed == second.seed == 5
    for (name, value), (_, other) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(value, other), name
    third, _ = fit(0, 6)
    assert not torch.equal(first.output.weight, third.output.weight)


def test_early_stopping_restores_the_best_weights():
    # Pure-noise labels and a large learning rate: the validation loss soon rises while the training loss falls.
    generator = torch.Generator().manual_seed(0)
    pool, target = _embeddings(40, 8, generator), _embeddings(10, 8, generator)
    labels = torch.rand(40, 10, generator=generator)
    network = InfluenceNetwork(embedding_dim=8, hidden_sizes=[64])
    history = network.fit(pool, target, labels, epochs=40, lr=3e-2, patience=2, seed=4)
    epochs_run = len(history["validation_loss"])
    assert history["stopped_early"] and epochs_run == history["best_epoch"] + 3
    assert history["best_validation_loss"] == min(history["validation_loss"]) < history["validation_loss"][-1]
    # The weights left in the network are the best epoch's: recompute its loss on the same validation pairs.
    _, validation = split_pairs(400, 0.1, torch.Generator().manual_seed(4))
    predicted = network.predict(pool, target).flatten()[validation]
    scale = network.label_max - network.label_min
    loss = torch.nn.functional.mse_loss(predicted, labels.flatten()[validation]) / scale**2
    assert loss.item() == pytest.approx(history["best_validation_loss"], rel=1e-4)


def test_held_out_split_keeps_whole_rows_and_columns_out_of_training():
    train, validation = split_held_out(20, 10, 0.2, torch.Generator().manual_seed(0))
    rows_of, columns_of = lambda pairs: set((pairs // 10).tolist()), lambda pairs: set((pairs % 10).tolist())
    assert len(train) + len(validation) == 200 and not set(train.tolist()) & set(validation.tolist())
    held_rows, held_columns = set(range(20)) - rows_of(train), set(range(10)) - columns_of(train)
    assert len(held_rows) == 4 and len(held_columns) == 2
    # Validation is exactly the pairs that touch a held-out row or column.
    expected = {r * 10 + c for r in range(20) for c in range(10) if r in held_rows or c in held_columns}
    assert set(validation.tolist()) == expected
    pointwise_train, pointwise_validation = split_held_out(20, 1, 0.2, torch.Generator().manual_seed(0))
    assert len(pointwise_validation) == 4 and len(pointwise_train) == 16
    with pytest.raises(ValueError, match="too small to learn from.*validation_split='pairs'"):
        split_held_out(3, 3, 0.5, torch.Generator().manual_seed(0))


def test_held_out_validation_loss_is_measured_on_unseen_rows_and_columns():
    generator = torch.Generator().manual_seed(0)
    pool, target = _embeddings(40, 8, generator), _embeddings(10, 8, generator)
    labels = torch.rand(40, 10, generator=generator)
    network = InfluenceNetwork(embedding_dim=8, hidden_sizes=[16])
    history = network.fit(pool, target, labels, epochs=5, lr=1e-2, patience=5, seed=3, validation_split="held_out")
    _, validation = split_held_out(40, 10, 0.1, torch.Generator().manual_seed(3))
    assert history["validation_pairs"] == len(validation) == 40 * 10 - 36 * 9
    predicted = network.predict(pool, target).flatten()[validation]
    scale = network.label_max - network.label_min
    loss = torch.nn.functional.mse_loss(predicted, labels.flatten()[validation]) / scale**2
    assert loss.item() == pytest.approx(history["best_validation_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="validation_split must be 'pairs' or 'held_out'"):
        network.fit(pool, target, labels, validation_split="rows")


def _labels_with(value, position, shape=(6, 5)):
    labels = torch.arange(shape[0] * (shape[1] if len(shape) > 1 else 1), dtype=torch.float32).reshape(shape)
    labels[position] = value
    return labels


@pytest.mark.parametrize(
    ("kind", "rows", "columns", "labels", "error"),
    [
        ("pairwise", 6, 5, _labels_with(float("nan"), (2, 3)), "nan at row 2, column 3"),
        ("pairwise", 6, 5, _labels_with(float("inf"), (4, 0)), "inf at row 4, column 0"),
        ("pointwise", 20, None, _labels_with(float("-inf"), 7, shape=(20,)), "-inf at row 7"),
        ("pairwise", 6, 5, torch.full((6, 5), 0.3), "constant block"),
        ("pairwise", 3, 3, torch.rand(3, 3), "too small to learn from"),
        ("pointwise", 10, None, torch.rand(10), "too small to learn from"),
        ("pairwise", 6, 5, torch.rand(5, 6), r"labels must have shape \[6, 5\]"),
    ],
)
def test_fit_refuses_bad_blocks(kind, rows, columns, labels, error):
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(rows, 8, generator=generator)
    target = None if columns is None else torch.randn(columns, 8, generator=generator)
    with pytest.raises(ValueError, match=error):
        InfluenceNetwork(kind=kind, embedding_dim=8).fit(pool, target, labels)


def test_embedding_checks_name_the_mismatch():
    network, pool, target, _ = _fitted_network()
    network.predict(pool, target, embedding_model="test/encoder")  # the recorded encoder is accepted
    with pytest.raises(ValueError, match="'other/encoder'.*'test/encoder'"):
        network.predict(pool, target, embedding_model="other/encoder")
    with pytest.raises(ValueError, match=r"expected embeddings of shape \[rows, 8\].*got \[60, 16\]"):
        network.predict(torch.randn(60, 16), target)
    with pytest.raises(ValueError, match=r"\[rows, 8\].*got \[12, 4\]"):
        network.top_candidates(pool, torch.randn(12, 4), k=3)
    with pytest.raises(ValueError, match=r"\[rows, 8\].*got \[30, 9\]"):
        network.fit(torch.randn(30, 9), target[:6], torch.rand(30, 6))
    with pytest.raises(RuntimeError, match="fit it"):
        InfluenceNetwork(embedding_dim=8).predict(pool, target)


def test_save_pretrained_round_trip(tmp_path):
    network, pool, target, labels = _fitted_network(hidden_sizes=[24, 12], seed=7)
    network.evaluate(pool, target, labels, torch.arange(30), torch.arange(6), k=3)
    network.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "README.md"} <= {path.name for path in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text()) == network.config
    loaded = InfluenceNetwork.from_pretrained(tmp_path)
    assert loaded.config == network.config
    assert loaded.config["label_min"] == network.label_min and loaded.config["metrics"]["Q4"]["rows"] == 30
    assert torch.equal(loaded.predict(pool, target), network.predict(pool, target))


def _rewrite_weights(folder, change):
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    change(tensors)
    safetensors.torch.save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda tensors: tensors.pop("output.bias"), 'Missing key.*"output.bias"'),
        (lambda tensors: tensors.update(extra=torch.zeros(2)), 'Unexpected key.*"extra"'),
        (lambda tensors: tensors.update({"hidden.0.weight": torch.zeros(100, 8)}), "size mismatch"),
    ],
)
def test_loading_is_strict(tmp_path, change, error):
    network, *_ = _fitted_network()
    network.save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, change)
    with pytest.raises(RuntimeError, match=error):
        InfluenceNetwork.from_pretrained(tmp_path)


def test_folders_without_config_or_safetensors_are_refused(tmp_path, monkeypatch):
    network, *_ = _fitted_network()
    network.save_pretrained(tmp_path)
    torch.save(network.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a pickle was loaded"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*never unpickles pytorch_model.bin"):
        InfluenceNetwork.from_pretrained(tmp_path)
    network.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        InfluenceNetwork.from_pretrained(tmp_path)


def test_hub_round_trip_and_pickle_only_repo(local_hub, tmp_path, monkeypatch):
    network, pool, target, labels = _fitted_network()
    repo_id = f"{local_hub.user}/influence-network"
    network.push_to_hub(repo_id)
    loaded = InfluenceNetwork.from_pretrained(repo_id)
    assert loaded.config == network.config
    assert torch.equal(loaded.predict(pool, target), network.predict(pool, target))

    # The mixin path publishes the real card: the repo in its snippet and model-index, the licence asked for,
    # and after evaluate() the plot of the unseen pairs.
    network.evaluate(pool, target, labels, torch.arange(30), torch.arange(6))
    card_repo = f"{local_hub.user}/evaluated-network"
    network.push_to_hub(card_repo, model_card_kwargs={"license": "apache-2.0"})
    card = ModelCard.load(card_repo)
    assert "<repo_id>" not in str(card) and f'select_with_network(pool, target, "{card_repo}"' in card.text
    assert card.data.model_name == card_repo and card.data.license == "apache-2.0"
    assert "predicted_vs_true.png" in card.text and "predicted_vs_true.png" in HfApi().list_repo_files(card_repo)

    pickle_repo = f"{local_hub.user}/pickle-only"
    api = HfApi()
    api.create_repo(pickle_repo)
    torch.save(network.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(network.config))
    api.upload_folder(folder_path=tmp_path, repo_id=pickle_repo)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("a pickle was loaded"))
    with pytest.raises(FileNotFoundError, match="pickle-only has no model.safetensors"):
        InfluenceNetwork.from_pretrained(pickle_repo)


@pytest.mark.parametrize(("label_min", "label_max"), [(1.0, 0.0), (0.5, 0.5), (0.0, float("nan")), (None, 1.0)])
def test_a_config_with_a_bad_label_range_is_refused(label_min, label_max):
    with pytest.raises(ValueError, match="label_min and label_max"):
        InfluenceNetwork(embedding_dim=4, label_min=label_min, label_max=label_max)


def test_loading_a_network_with_non_finite_weights_is_refused(tmp_path):
    network = InfluenceNetwork(embedding_dim=4, label_min=0.0, label_max=1.0)
    with torch.no_grad():
        network.output.weight[0, 3] = float("nan")
    network.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match="'output.weight'.*NaN"):
        InfluenceNetwork.from_pretrained(str(tmp_path / "nan"))
