"""Tests for hf_influence.selection.streaming: streaming selection == in-memory selection, exactly; ties; errors.

The in-memory reference is select_indices (itself tested against brute-force loops in test_selection.py) on the
whole score matrix; its rows are checked against the predictors' own predict() and against closed forms.
"""

import numpy as np
import pytest
import torch

from hf_influence.selection.landmarks import LandmarkRegressor
from hf_influence.networks.network import InfluenceNetwork
from hf_influence.selection.rules import SelectionError, select_indices
from hf_influence.extraction.store import IncompleteStoreError, StoreSpec, VectorStore
from hf_influence.selection.streaming import ScoreStream, iter_scores, predict_scores, stream_select

N, DIM, LANDMARKS, TARGETS = 301, 12, 40, 6  # N is prime: no chunk or block size divides it
GROUPS = ["b", "a", "b", "c", "a", "b"]  # one label per target column, deliberately unsorted
RULES = ("round_robin", "round_robin_task", "mean_top_k", "less")
CHUNKS = (1, 7, 64, N, 1000)  # 1 row, sizes that do not divide N, exactly N, more than N
BLOCK = 32


def embeddings(seed=0, n=N):
    """Pool embeddings in three clusters (a kernel regression has something to interpolate)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(3, DIM, generator=generator)
    return centres[torch.arange(n) % 3] + torch.randn(n, DIM, generator=generator)


def regressor(kernel, pool, seed=0):
    generator = torch.Generator().manual_seed(seed + 1)
    landmarks = pool[torch.randperm(len(pool), generator=generator)[:LANDMARKS]]
    scores = torch.tanh(landmarks @ torch.randn(DIM, TARGETS, generator=generator) / DIM**0.5)
    return LandmarkRegressor().fit(landmarks, scores, kernel=kernel, seed=seed)


def network(kind, hidden_sizes=(16,)):
    return InfluenceNetwork(kind=kind, embedding_dim=DIM, hidden_sizes=list(hidden_sizes), label_min=-1.0,
                            label_max=2.0, seed=3)


def target_embeddings():
    return torch.randn(TARGETS, DIM, generator=torch.Generator().manual_seed(7))


# name -> (predictor, target_embeddings, target columns)
PREDICTORS = {
    "rbf": lambda pool: (regressor("rbf", pool), None, TARGETS),
    "linear": lambda pool: (regressor("linear", pool), None, TARGETS),
    "network_pairwise": lambda pool: (network("pairwise"), target_embeddings(), TARGETS),
    "network_pairwise_deep": lambda pool: (network("pairwise", (16, 8)), target_embeddings(), TARGETS),
    "network_pointwise": lambda pool: (network("pointwise"), None, 1),
}


def groups_for(rule, columns):
    if rule == "round_robin_task":
        return GROUPS[:columns] if columns > 1 else ["only"]
    if rule == "less" and columns > 1:
        return GROUPS
    return None


def make_store(path, rows, dtype="float16", shard_rows=50):
    spec = StoreSpec(kind="jvp_embeddings", model_id="test/model", model_revision=None, dataset_fingerprint="pool",
                     config={"dim": rows.shape[1]}, num_rows=len(rows), dim=rows.shape[1], dtype=dtype,
                     shard_rows=shard_rows)
    store = VectorStore.create_or_open(path, spec)
    for start in range(0, len(rows), 40):  # written chunk-wise, across shard boundaries
        store.write(start, rows[start : start + 40])
    return VectorStore.open(path)


# ---- streaming == in-memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("predictor_name", list(PREDICTORS))
@pytest.mark.parametrize("rule", RULES)
def test_stream_select_equals_in_memory_selection(predictor_name, rule):
    pool = embeddings()
    predictor, targets, columns = PREDICTORS[predictor_name](pool)
    groups = groups_for(rule, columns)
    full = predict_scores(pool, predictor, targets, block_rows=BLOCK)
    assert full.shape == (N, columns)
    for budget in (1, 37, N):
        expected = select_indices(full, budget, rule=rule, seed=5, target_groups=groups)
        for chunk_rows in CHUNKS:
            chosen = stream_select(pool, predictor, budget, rule, target_embeddings=targets, target_groups=groups,
                                   seed=5, chunk_rows=chunk_rows, block_rows=BLOCK)
            assert chosen.dtype == torch.long
            assert torch.equal(chosen, expected), (budget, chunk_rows)


@pytest.mark.parametrize("predictor_name", list(PREDICTORS))
def test_predicted_scores_match_the_predictors_own_predict(predictor_name):
    pool = embeddings()
    predictor, targets, _ = PREDICTORS[predictor_name](pool)
    full = predict_scores(pool, predictor, targets, block_rows=BLOCK)
    if isinstance(predictor, LandmarkRegressor):
        # Closed form in float64, independent of both implementations.
        landmarks, centred = predictor.landmarks, pool.double() - predictor.center
        if predictor.kernel == "rbf":
            kernel = torch.exp(-torch.cdist(centred, landmarks).square() / (2 * predictor.sigma**2))
        else:
            kernel = centred @ landmarks.T
        closed = kernel @ predictor.alpha + predictor.offset
        scale = closed.abs().max().item()
        # Scores come out in the dtype of the landmark scores (float32 here), whatever the compute dtype.
        exact = predict_scores(pool, predictor, block_rows=BLOCK, compute_dtype=torch.float64)
        for scores, tolerance in ((predictor.predict(pool), 1e-6), (exact, 1e-6), (full, 1e-5)):
            assert scores.dtype == torch.float32
            torch.testing.assert_close(scores.double(), closed, rtol=tolerance, atol=tolerance * scale)
    else:
        reference = predictor.predict(pool, targets)
        torch.testing.assert_close(full, reference.reshape(N, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("predictor_name", list(PREDICTORS))
def test_scores_are_bitwise_independent_of_chunk_rows(predictor_name):
    pool = embeddings()
    predictor, targets, _ = PREDICTORS[predictor_name](pool)
    full = predict_scores(pool, predictor, targets, block_rows=BLOCK)
    for chunk_rows in CHUNKS:
        starts, chunks = zip(*iter_scores(pool, predictor, targets, chunk_rows=chunk_rows, block_rows=BLOCK))
        assert list(starts) == list(range(0, N, chunk_rows))
        assert all(len(chunk) == min(chunk_rows, N - start) for start, chunk in zip(starts, chunks))
        assert torch.equal(torch.cat(chunks), full)


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("rule", RULES)
def test_float64_streaming_equals_selection_on_landmark_regressor_predict(kernel, rule):
    """Against the existing in-memory path (LandmarkRegressor.predict + select_indices), without our blocks."""
    pool = embeddings(seed=4)
    predictor = regressor(kernel, pool, seed=4)
    groups = groups_for(rule, TARGETS)
    expected = select_indices(predictor.predict(pool), 50, rule=rule, seed=1, target_groups=groups)
    for chunk_rows in (1, 64, 1000):
        chosen = stream_select(pool, predictor, 50, rule, target_groups=groups, seed=1, chunk_rows=chunk_rows,
                               block_rows=BLOCK, compute_dtype=torch.float64)
        assert torch.equal(chosen, expected)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("predictor_name", ["rbf", "linear", "network_pairwise"])
def test_memory_mapped_store_equals_in_memory_tensor(tmp_path, dtype, predictor_name):
    pool = embeddings()
    store = make_store(tmp_path / "store", pool.numpy(), dtype=dtype)
    stored = store.to_tensor(torch.float32)  # the values the store holds (fp16-rounded for float16)
    if dtype == "float16":
        assert not torch.equal(stored, pool)
    predictor, targets, _ = PREDICTORS[predictor_name](stored)
    full = predict_scores(stored, predictor, targets, block_rows=BLOCK)
    assert torch.equal(predict_scores(store, predictor, targets, block_rows=BLOCK), full)
    for rule in ("round_robin", "mean_top_k"):
        expected = select_indices(full, 60, rule=rule, seed=2)
        for chunk_rows in (1, 7, 1000):
            chosen = stream_select(store, predictor, 60, rule, target_embeddings=targets, seed=2,
                                   chunk_rows=chunk_rows, block_rows=BLOCK)
            assert torch.equal(chosen, expected)
    # A bare memory-mapped array works as well.
    memmap = np.load(store.path / "shard-00000.npy", mmap_mode="r")
    chosen = stream_select(memmap, predictor, 10, target_embeddings=targets, chunk_rows=7, block_rows=BLOCK)
    assert torch.equal(chosen, select_indices(predict_scores(stored[: len(memmap)], predictor, targets,
                                                             block_rows=BLOCK), 10))


# ---- ties ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_ties_from_an_underflowing_rbf_kernel(rule):
    """Rows far from every landmark score exactly the intercept (kernel 0) for every target: tied, they go by
    lower row."""
    pool = embeddings()
    predictor = regressor("rbf", pool[:150])
    far = pool.clone()
    far[150:] += 1e4  # exp(-distance^2 / 2 sigma^2) underflows to 0.0
    full = predict_scores(far, predictor, block_rows=BLOCK)
    intercept = predictor.offset.float()
    assert bool((full[150:] == intercept).all()) and bool((full[:150] < intercept).any())
    groups = groups_for(rule, TARGETS)
    for budget in (200, N):  # reaches into the tied zeros
        expected = select_indices(full, budget, rule=rule, seed=9, target_groups=groups)
        for chunk_rows in CHUNKS:
            chosen = stream_select(far, predictor, budget, rule, target_groups=groups, seed=9,
                                   chunk_rows=chunk_rows, block_rows=BLOCK)
            assert torch.equal(chosen, expected)
    if rule == "mean_top_k":  # brute force: by (-mean, row)
        means = full.mean(1).tolist()
        assert stream_select(far, predictor, 200, rule, chunk_rows=7, block_rows=BLOCK).tolist() == sorted(
            range(N), key=lambda row: (-means[row], row))[:200]


@pytest.mark.parametrize("rule", RULES)
def test_all_tied_scores_select_the_lowest_rows(rule):
    """A network with a zero output layer predicts one constant: every rule takes rows 0, 1, 2, ..."""
    dead = network("pairwise")
    with torch.no_grad():
        dead.output.weight.zero_()
    for chunk_rows in CHUNKS:
        chosen = stream_select(embeddings(), dead, 45, rule, target_embeddings=target_embeddings(),
                               target_groups=groups_for(rule, TARGETS), chunk_rows=chunk_rows, block_rows=BLOCK)
        assert chosen.tolist() == list(range(45))


INTEGER_SCORES = {  # [N, TARGETS] score patterns for the candidate buffer, as exact overrides of every row
    "few_levels": lambda: torch.randint(0, 3, (N, TARGETS), generator=torch.Generator().manual_seed(0)).float(),
    "increasing": lambda: torch.arange(N, dtype=torch.float32)[:, None].repeat(1, TARGETS),  # every row enters
    "decreasing": lambda: -torch.arange(N, dtype=torch.float32)[:, None].repeat(1, TARGETS),
    "mixed": lambda: torch.stack([torch.arange(N) % 5, -(torch.arange(N) // 3), torch.arange(N) % 2,
                                  torch.arange(N), torch.zeros(N, dtype=torch.long), torch.arange(N) % 7], 1).float(),
}


@pytest.mark.parametrize("pattern", list(INTEGER_SCORES))
@pytest.mark.parametrize("rule", RULES)
def test_candidate_buffer_on_tie_heavy_and_adversarial_orders(pattern, rule):
    """Known scores for every row (exact overrides) make heavy ties and orders that force many prunes."""
    pool = embeddings()
    predictor = regressor("linear", pool)
    scores = INTEGER_SCORES[pattern]()
    every_row = torch.arange(N)
    groups = groups_for(rule, TARGETS)
    assert torch.equal(predict_scores(pool, predictor, exact_rows=every_row, exact_scores=scores), scores)
    for budget in (1, 10, 150, N):
        expected = select_indices(scores, budget, rule=rule, seed=4, target_groups=groups)
        for chunk_rows in CHUNKS:
            chosen = stream_select(pool, predictor, budget, rule, target_groups=groups, seed=4, chunk_rows=chunk_rows,
                                   block_rows=BLOCK, exact_rows=every_row, exact_scores=scores)
            assert torch.equal(chosen, expected), (budget, chunk_rows)


def test_exact_landmark_scores_replace_predictions():
    """As influence_distillation does: landmarks keep their exact scores (given in any order)."""
    pool = embeddings()
    predictor = regressor("rbf", pool)
    rows = torch.tensor([300, 5, 77, 31, 32, 0])
    exact = torch.full((len(rows), TARGETS), 50.0) + torch.arange(len(rows))[:, None]
    full = predict_scores(pool, predictor, block_rows=BLOCK)
    full[rows] = exact
    assert torch.equal(predict_scores(pool, predictor, block_rows=BLOCK, exact_rows=rows, exact_scores=exact), full)
    for rule in RULES:
        groups = groups_for(rule, TARGETS)
        chosen = stream_select(pool, predictor, 20, rule, target_groups=groups, chunk_rows=7, block_rows=BLOCK,
                               exact_rows=rows, exact_scores=exact)
        assert torch.equal(chosen, select_indices(full, 20, rule=rule, target_groups=groups))
    assert stream_select(pool, predictor, 6, "mean_top_k", exact_rows=rows, exact_scores=exact).tolist() == [
        0, 32, 31, 77, 5, 300]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_candidates_then_exact_rows_equal_a_second_pass(rule, dtype):
    """The default's shortlist path: one pass with the landmarks' (leave-one-out) scores, then the landmarks and
    the shortlist made exact; the retained candidates select what a second stream_select with the final exact
    rows selects; exact scores in float64 are cast to the stream's float32 as the overrides are."""
    pool = embeddings()
    predictor = regressor("rbf", pool)
    groups = groups_for(rule, TARGETS)
    landmarks = torch.tensor([300, 5, 77, 31])
    generator = torch.Generator().manual_seed(4)
    first = torch.randn(len(landmarks), TARGETS, generator=generator, dtype=dtype)
    budget, size = 12, 30
    stream = ScoreStream(pool, predictor, {"exact_rows": landmarks, "exact_scores": first}, chunk_rows=7,
                         block_rows=BLOCK)
    candidates = stream.candidates(budget + len(landmarks) + size, rule, groups)
    shortlist = candidates.select(size, seed=2)
    assert torch.equal(shortlist, stream_select(pool, predictor, size, rule, target_groups=groups, seed=2,
                                                block_rows=BLOCK, exact_rows=landmarks, exact_scores=first))
    new = shortlist[~torch.isin(shortlist, landmarks)]
    rows = torch.cat([landmarks, new])
    final = torch.cat([first + 1.0, 3.0 * torch.randn(len(new), TARGETS, generator=generator, dtype=dtype)])
    candidates = candidates.replaced(rows, final)
    for take in (1, budget, candidates.valid):
        second = stream_select(pool, predictor, take, rule, target_groups=groups, seed=2, block_rows=BLOCK,
                               exact_rows=rows, exact_scores=final)
        assert torch.equal(candidates.select(take, seed=2), second), take


def test_an_exact_sub_block_replaces_only_its_columns():
    """As NN-CIFT does: the oracle's block (rows x some target columns) keeps its values, the rest is predicted."""
    pool = embeddings()
    predictor = network("pairwise")
    targets = target_embeddings()
    rows, columns = torch.tensor([300, 5, 77, 31]), torch.tensor([4, 1])
    exact = torch.full((len(rows), len(columns)), 9.0) + torch.arange(len(rows) * 2).reshape(-1, 2)
    full = predict_scores(pool, predictor, targets, block_rows=BLOCK)
    full[rows.unsqueeze(1), columns.unsqueeze(0)] = exact
    streamed = predict_scores(pool, predictor, targets, block_rows=BLOCK, exact_rows=rows, exact_scores=exact,
                              exact_columns=columns)
    assert torch.equal(streamed, full)
    for rule in RULES:
        groups = groups_for(rule, TARGETS)
        chosen = stream_select(pool, predictor, 20, rule, target_embeddings=targets, target_groups=groups,
                               chunk_rows=7, block_rows=BLOCK, exact_rows=rows, exact_scores=exact,
                               exact_columns=columns)
        assert torch.equal(chosen, select_indices(full, 20, rule=rule, target_groups=groups))
    with pytest.raises(ValueError, match=r"exact_columns must be distinct target columns in \[0, 6\)"):
        predict_scores(pool, predictor, targets, exact_rows=rows, exact_scores=exact, exact_columns=torch.tensor([1, 6]))
    with pytest.raises(ValueError, match=r"exact_scores must have shape \[4, 2\] \(exact_rows x exact_columns\)"):
        predict_scores(pool, predictor, targets, exact_rows=rows, exact_scores=exact[:, :1], exact_columns=columns)


def test_mean_top_k_and_seed():
    pool = embeddings()
    predictor = regressor("rbf", pool)
    full = predict_scores(pool, predictor, block_rows=BLOCK)
    chosen = stream_select(pool, predictor, 30, "mean_top_k", chunk_rows=7, block_rows=BLOCK)
    assert torch.equal(chosen, full.mean(1).sort(descending=True, stable=True).indices[:30])
    picks = {tuple(stream_select(pool, predictor, 30, seed=seed, block_rows=BLOCK).tolist()) for seed in range(4)}
    assert len(picks) > 1  # the seed drives the round-robin visiting order
    assert stream_select(pool, predictor, 30, seed=3).tolist() == stream_select(pool, predictor, 30, seed=3).tolist()


# ---- errors -------------------------------------------------------------------------------------------------


def test_errors_name_the_argument(tmp_path):
    pool = embeddings()
    predictor = regressor("rbf", pool)
    with pytest.raises(SelectionError, match=rf"budget 302 is larger than the pool \({N} rows\)"):
        stream_select(pool, predictor, N + 1)
    with pytest.raises(SelectionError, match="budget must be an int"):
        stream_select(pool, predictor, 0.5)
    with pytest.raises(ValueError, match="dimension 13 but the LandmarkRegressor expects 12"):
        stream_select(torch.zeros(10, DIM + 1), predictor, 2)
    store = make_store(tmp_path / "wide", np.ones((20, DIM + 2), dtype=np.float32))
    with pytest.raises(ValueError, match="dimension 14 but the LandmarkRegressor expects 12"):
        stream_select(store, predictor, 2)
    with pytest.raises(ValueError, match="the pool is empty"):
        stream_select(torch.zeros(0, DIM), predictor, 1)
    spec = StoreSpec(kind="jvp_embeddings", model_id="m", model_revision=None, dataset_fingerprint="f", config={},
                     num_rows=20, dim=DIM, dtype="float16")
    unwritten = VectorStore.create_or_open(tmp_path / "unwritten", spec)
    with pytest.raises(IncompleteStoreError, match="20 of the 20 rows .* have not been written \\(first: row 0\\)"):
        stream_select(unwritten, predictor, 1)
    unwritten.write(0, np.ones((12, DIM)))
    with pytest.raises(IncompleteStoreError, match="8 of the 20 rows .*first: row 12"):
        stream_select(unwritten, predictor, 1)
    with pytest.raises(ValueError, match="2-D"):
        stream_select(torch.zeros(DIM), predictor, 1)
    with pytest.raises(SelectionError, match="facility_location needs the whole score matrix"):
        stream_select(pool, predictor, 3, "facility_location")
    with pytest.raises(SelectionError, match="needs target_groups"):
        stream_select(pool, predictor, 3, "round_robin_task")
    with pytest.raises(SelectionError, match="target_groups has 2 labels but scores has 6 target columns"):
        stream_select(pool, predictor, 3, "less", target_groups=["a", "b"])
    with pytest.raises(SelectionError, match="does not use target_groups"):
        stream_select(pool, predictor, 3, "mean_top_k", target_groups=GROUPS)
    with pytest.raises(SelectionError, match="seed must be an int"):
        stream_select(pool, predictor, 3, seed=1.5)
    for name in ("chunk_rows", "block_rows"):
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
            stream_select(pool, predictor, 3, **{name: 0})
    with pytest.raises(ValueError, match="compute_dtype"):
        stream_select(pool, predictor, 3, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="not fitted"):
        stream_select(pool, LandmarkRegressor(), 3)
    with pytest.raises(ValueError, match="holds its targets in alpha"):
        stream_select(pool, predictor, 3, target_embeddings=target_embeddings())
    with pytest.raises(TypeError, match="LandmarkRegressor or InfluenceNetwork, got Tensor"):
        stream_select(pool, torch.zeros(3), 3)
    with pytest.raises(ValueError, match="needs target_embeddings"):
        stream_select(pool, network("pairwise"), 3)
    with pytest.raises(ValueError, match=r"expected embeddings of shape \[rows, 12\]"):
        stream_select(pool, network("pairwise"), 3, target_embeddings=torch.zeros(TARGETS, 5))
    with pytest.raises(ValueError, match="pass target_embeddings=None"):
        stream_select(pool, network("pointwise"), 3, target_embeddings=target_embeddings())
    with pytest.raises(RuntimeError, match="no label range"):
        stream_select(pool, InfluenceNetwork(embedding_dim=DIM), 3, target_embeddings=target_embeddings())
    with pytest.raises(ValueError, match="embedding_model"):
        stream_select(pool, network("pairwise"), 3, target_embeddings=target_embeddings(), embedding_model="other")
    with pytest.raises(ValueError, match=r"exact_rows holds row 301, outside the pool's rows \[0, 301\)"):
        stream_select(pool, predictor, 3, exact_rows=torch.tensor([301]), exact_scores=torch.zeros(1, TARGETS))
    with pytest.raises(ValueError, match="exact_rows holds row 4 more than once"):
        stream_select(pool, predictor, 3, exact_rows=torch.tensor([4, 4]), exact_scores=torch.zeros(2, TARGETS))
    with pytest.raises(ValueError, match=r"exact_scores must have shape \[1, 6\]"):
        stream_select(pool, predictor, 3, exact_rows=torch.tensor([4]), exact_scores=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="give both exact_rows and exact_scores"):
        stream_select(pool, predictor, 3, exact_rows=torch.tensor([4]))
    broken = pool.clone()
    broken[123, 4] = float("nan")
    with pytest.raises(SelectionError, match="non-finite value .* at pool row 123, target column 0"):
        stream_select(broken, predictor, 3, chunk_rows=50)
