"""select_by_influence end to end on tiny models: landmarks = pool reproduces exact ID, API contract, errors."""

import datasets
import pytest
import scipy.stats
import torch

import hf_influence
from hf_influence import InfluenceDistillationConfig, ScoreTable, SelectionError, select_by_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.extraction.extract import extract_gradients
from hf_influence.formatting import FormattingError
from hf_influence.influence import register_dataset_method
from hf_influence.selection.landmarks import BANDWIDTH_GRID, RIDGE_GRID, LandmarkRegressor
from hf_influence.methods.influence_distillation import LOO_SPEARMAN_WARNING, landmark_diagnostics
from hf_influence.selection.rules import select_indices
from hf_influence.testing import lora_model, tiny_causal_lm

# Small and quiet: 1 JVP block (the tiny model has 2), short warm-up, small projections.
FAST = {"num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "warmup_show_progress": False,
        "show_progress": False,
        "projection_dim": 512, "jvp_projection_dim": 256}


@pytest.fixture(scope="module")
def pool():
    return demo_pool(5, seed=0)  # 20 rows, 4 domains


@pytest.fixture(scope="module")
def target():
    return demo_target("math", 3, seed=1)


@pytest.fixture
def model():
    return lora_model(seed=0)


def _select(pool, target, model, **options):
    network, tokenizer = model
    return select_by_influence(pool, target, model=network, tokenizer=tokenizer, return_scores=True,
                               **{**FAST, **options})


@pytest.mark.parametrize(
    ("optimizer_state", "order", "hessian", "landmark_selection", "kernel"),
    [("warmup", 1, "exact", "uniform", "rbf"), ("gd", 1, "exact", "kmeans++", "linear"),
     ("warmup", 2, "exact", "uniform", "rbf"), ("gd", 2, "exact", "uniform", "rbf"),
     ("warmup", 2, "gauss_newton", "kmeans++", "rbf")],
)
@pytest.mark.slow
def test_landmarks_equal_to_the_pool_reproduce_exact_influence(pool, target, model, optimizer_state, order, hessian,
                                                               landmark_selection, kernel):
    options = {"budget": 6, "optimizer_state": optimizer_state, "order": order, "step_size": 1e-3,
               "hessian": hessian}
    selected, table = _select(pool, target, model, num_landmarks=len(pool), landmark_selection=landmark_selection,
                              kernel=kernel, exact_gradient_fraction=None, **options)
    exact_selected, exact_table = _select(pool, target, model, method="influence_distillation_exact", **options)
    scores, rows, targets = table.to_matrix()
    exact_scores, exact_rows, exact_targets = exact_table.to_matrix()
    assert rows == exact_rows and targets == exact_targets
    torch.testing.assert_close(scores, exact_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.weights, exact_table.weights, rtol=1e-4, atol=1e-4)
    assert selected["id"] == exact_selected["id"]
    assert bool(table.landmark_mask.all())


def _copied_pool(copies: int = 4):
    """12 distinct demo rows, `copies` times each under their own ids: a row's JVP embedding then determines its
    gradient, so a faithful landmark regression predicts every row that has a copy among the landmarks."""
    base = demo_pool(3, seed=0)
    return datasets.Dataset.from_list([dict(row, id=f"{row['id']}/copy{c}") for c in range(copies) for row in base])


@pytest.mark.parametrize("landmark_features", ["lm", "jvp+lm", "truncated_gradient", "hidden_state"])
def test_other_regression_features_reproduce_exact_influence_with_landmarks_equal_to_the_pool(
        pool, target, model, landmark_features):
    _, table = _select(pool, target, model, budget=4, num_landmarks=len(pool), landmark_features=landmark_features,
                       exact_gradient_fraction=None, hidden_state_blocks=1)
    _, exact = _select(pool, target, lora_model(seed=0), budget=4, method="influence_distillation_exact")
    torch.testing.assert_close(table.to_matrix()[0], exact.to_matrix()[0])
    assert table.provenance["selected_pool_row_ids"] == exact.provenance["selected_pool_row_ids"]
    part = landmark_features if landmark_features in ("truncated_gradient", "hidden_state") else "lm"
    assert f"{part}_embeddings" in table.provenance["details"]["seconds"]


def test_hidden_state_features_are_the_base_models_truncated_last_token_states(pool, target, tmp_path):
    """landmark_features="hidden_state" regresses on each pool row's base-model state after hidden_state_blocks
    blocks (brute force: lm_pooled_embeddings with the adapter off), kept in work_dir/hidden_states beside (not
    in place of) the RDS+ store; with fewer landmarks than rows its scores differ from the JVP features'."""
    from hf_influence.formatting import FormattingConfig, format_dataset
    from hf_influence.extraction.store import VectorStore
    from hf_influence.rds_embeddings import lm_pooled_embeddings

    network, tokenizer = lora_model(seed=0)
    options = {"budget": 4, "num_landmarks": 8, "shortlist_factor": 0, "exact_gradient_fraction": None}
    _, table = _select(pool, target, (network, tokenizer), **options, landmark_features="hidden_state",
                       hidden_state_blocks=1, work_dir=str(tmp_path))
    store = VectorStore.open(tmp_path / "hidden_states")
    assert store.manifest["config"]["pooling"] == "last_token" and store.manifest["config"]["num_blocks"] == 1
    formatted = format_dataset(pool, tokenizer, FormattingConfig(), show_progress=False).dataset
    assert store.row_ids.tolist() == formatted["row_id"]
    with network.disable_adapter():
        expected = lm_pooled_embeddings(network, formatted, pad_token_id=tokenizer.pad_token_id,
                                        show_progress=False, pooling="last", num_blocks=1)
    torch.testing.assert_close(store.to_tensor(), expected)
    assert not (tmp_path / "lm_embeddings").exists()
    _, jvp = _select(pool, target, lora_model(seed=0), **options)
    assert not torch.allclose(table.to_matrix()[0], jvp.to_matrix()[0])


@pytest.mark.parametrize("rule", ["round_robin", "mean_top_k"])
def test_fewer_landmarks_track_exact_influence_without_favouring_landmarks(target, rule):
    pool = _copied_pool()  # 48 rows, 16 landmarks
    _, exact = _select(pool, target, lora_model(seed=0), budget=12, method="influence_distillation_exact",
                       selection=rule)
    # No shortlist: this is the regression alone (with one, 4 x 12 rows would cover the pool).
    _, table = _select(pool, target, lora_model(seed=0), budget=12, num_landmarks=16, selection=rule,
                       shortlist_factor=0)
    exact_means = exact.to_matrix()[0].double().mean(1)
    means = table.to_matrix()[0].double().mean(1)
    assert scipy.stats.spearmanr(means, exact_means).statistic >= 0.8
    diagnostics = table.provenance["details"]["landmarks"]
    selected = table.provenance["selected_pool_row_ids"]
    share = float(table.landmark_mask[selected].float().mean())
    assert diagnostics["landmark_share_selected"] == pytest.approx(share)
    assert diagnostics["landmark_share_pool"] == pytest.approx(16 / 48)
    # Landmarks are ranked by leave-one-out predictions: their share of the selection stays near their pool share.
    assert share <= 2 * diagnostics["landmark_share_pool"]
    assert diagnostics["landmark_scores"] == "loo" and diagnostics["num_landmarks"] == 16
    assert diagnostics["loo_spearman"] > 0.5 and diagnostics["ridge"] in RIDGE_GRID
    assert diagnostics["bandwidth_scale"] in BANDWIDTH_GRID and diagnostics["bandwidth"] > 0


@pytest.mark.parametrize(("rule", "landmark_scores"),
                         [("round_robin", "loo"), ("mean_top_k", "loo"), ("round_robin", "exact")])
@pytest.mark.slow
def test_the_shortlist_scores_the_rows_the_regression_ranks_highest_exactly(target, rule, landmark_scores):
    """Brute force: the shortlist is the rule's choice of shortlist_factor x budget rows from the run without a
    shortlist (landmarks ranked by leave-one-out, or exactly with landmark_scores="exact"); those rows then carry
    exact influence, every other row its score in the run without shortlist, and the rule selects from that. It cannot pick worse rows than no shortlist."""
    pool, budget = _copied_pool(), 4  # 48 rows, 8 landmarks: the regression alone is far from exact
    options = {"budget": budget, "selection": rule}
    _, exact = _select(pool, target, lora_model(seed=0), **options, method="influence_distillation_exact")
    options.update(landmark_scores=landmark_scores, exact_gradient_fraction=None, num_landmarks=8)
    _, plain = _select(pool, target, lora_model(seed=0), **options, shortlist_factor=0)
    _, refined = _select(pool, target, lora_model(seed=0), **options, shortlist_factor=3)
    exact_scores, plain_scores, refined_scores = (t.to_matrix()[0] for t in (exact, plain, refined))
    shortlist = select_indices(plain_scores, 3 * budget, rule=rule)
    scored_exactly = torch.zeros(len(pool), dtype=torch.bool)
    scored_exactly[shortlist] = True
    if landmark_scores == "exact":
        scored_exactly |= plain.landmark_mask
    torch.testing.assert_close(refined_scores[scored_exactly], exact_scores[scored_exactly], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(refined_scores[~scored_exactly], plain_scores[~scored_exactly])
    selected = refined.provenance["selected_pool_row_ids"]
    assert selected == select_indices(refined_scores, budget, rule=rule).tolist()
    network, tokenizer = lora_model(seed=0)  # without a score table the scores stream: the same rows
    streamed = select_by_influence(pool, target, model=network, tokenizer=tokenizer, **FAST, **options,
                                   shortlist_factor=3)
    assert streamed["id"] == pool.select(selected)["id"]
    details = refined.provenance["details"]
    diagnostics = details["landmarks"]
    assert diagnostics["shortlist_rows"] == 3 * budget
    assert diagnostics["landmark_scores"] == ("exact" if landmark_scores == "exact" else "loo outside the shortlist")
    new = torch.zeros(len(pool), dtype=torch.bool)
    new[shortlist] = True
    new &= ~plain.landmark_mask
    assert diagnostics["shortlist_new_gradients"] == int(new.sum())
    assert diagnostics["shortlist_rule"] == rule and -1 <= diagnostics["shortlist_spearman"] <= 1
    cost = details["exact_gradients"]
    assert cost["exact_gradient_rows"] == 8 + int(new.sum()) and cost["bound_rows"] is None
    assert cost["decided_by"] == "ID + exact re-rank (12 shortlisted rows)"
    assert cost["predicted_speedup_vs_exact"] == pytest.approx(1 / (0.19 + cost["exact_gradient_rows"] / 48))

    def overlap(table):
        chosen, best = set(table.provenance["selected_pool_row_ids"]), set(exact.provenance["selected_pool_row_ids"])
        return len(chosen & best) / len(chosen | best)

    if landmark_scores == "loo":  # exact landmarks tie with their copies' exact scores, which exact ID picks first
        assert overlap(refined) >= overlap(plain) and overlap(refined) > 0


@pytest.mark.parametrize(("rows", "budget", "options", "expected"), [
    # The default at a real budget: landmarks take a quarter of 14% of the pool, the shortlist the rest.
    (100_000, 5_000, {}, (3500, 10500, 14000)),
    (100_000, 10_000, {}, (3500, 10500, 14000)),
    # A small budget: 4 x budget fits under the bound.
    (100_000, 1_000, {}, (3500, 4000, 14000)),
    # A tiny pool: at least 16 landmarks, the shortlist gets what the bound leaves (nothing here).
    (40, 4, {}, (16, 0, 5)),
    # No budget (compute_scores): no shortlist, the landmarks take the whole bound.
    (100_000, None, {}, (4096, 0, 14000)),
    (100_000, None, {"num_landmarks": 50_000}, (14000, 0, 14000)),
    # No bound: the settings as given (the shortlist then grows with the budget).
    (100_000, 10_000, {"exact_gradient_fraction": None}, (4096, 40000, None)),
    # Every row a landmark: exact influence, no shortlist.
    (100, 5, {"exact_gradient_fraction": None, "num_landmarks": 100}, (100, 0, None)),
    (100_000, 10_000, {"shortlist_factor": 0}, (4096, 0, 14000)),
])
def test_exact_gradient_plan_bounds_landmarks_and_shortlist(rows, budget, options, expected):
    from hf_influence.methods.influence_distillation import exact_gradient_plan

    plan = exact_gradient_plan(InfluenceDistillationConfig(**options), rows, budget)
    assert (plan.landmarks, plan.shortlist, plan.bound) == expected
    if plan.bound is not None:
        assert plan.landmarks + plan.shortlist <= max(plan.bound, 16)


def test_feature_costs_are_the_committed_measurement():
    """The predicted speed-up's per-feature costs are the fidelity lab's measured ones (a rerun of the lab that
    moves them must move the constants too). truncated_gradient is the lab's trunc4: JVPConfig.num_blocks's
    default of 4 blocks."""
    import json
    from pathlib import Path

    from hf_influence.extraction.jvp import JVPConfig
    from hf_influence.methods.influence_distillation import FEATURE_COSTS
    from hf_influence.methods.influence_distillation_config import LANDMARK_FEATURES, InfluenceDistillationConfig

    lab = Path(__file__).parents[1] / "benchmarks" / "results" / "landmark_fidelity_cpu.json"
    measured = json.loads(lab.read_text())["feature_costs"]["measured"]["fraction_of_gradient"]
    assert JVPConfig().num_blocks == 4
    defaults = InfluenceDistillationConfig()  # hidden_state is the lab's lm8_last: 8 blocks, the last token
    assert (defaults.hidden_state_blocks, defaults.hidden_state_pooling) == (8, "last")
    names = {"jvp": "jvp", "lm": "lm", "truncated_gradient": "trunc4", "hidden_state": "lm8_last"}
    assert {part for feature in LANDMARK_FEATURES for part in feature.split("+")} == set(FEATURE_COSTS)
    assert FEATURE_COSTS == {part: round(measured[names[part]], 2) for part in FEATURE_COSTS}


def test_a_bounded_run_takes_no_more_exact_gradients_than_the_bound_and_reports_it(target):
    pool = _copied_pool()  # 48 rows; bound 0.5 x 48 = 24: 16 landmarks (the minimum), a shortlist of 8
    _, table = _select(pool, target, lora_model(seed=0), budget=4, exact_gradient_fraction=0.5)
    cost = table.provenance["details"]["exact_gradients"]
    assert (cost["bound_rows"], cost["landmark_rows"], cost["shortlist_rows"]) == (24, 16, 8)
    assert cost["exact_gradient_rows"] <= 24 and int(table.landmark_mask.sum()) == 16
    new = table.provenance["details"]["landmarks"]["shortlist_new_gradients"]
    assert cost["exact_gradient_rows"] == 16 + new
    assert cost["measured_speedup_vs_exact"] > 0


def test_the_shortlist_needs_a_budget_and_first_order(pool, target, model):
    from hf_influence.engine import compute_scores

    network, tokenizer = model
    with pytest.raises(ValueError, match="shortlist_factor > 0 needs the run's budget"):
        compute_scores(pool, target, model=network, tokenizer=tokenizer, shortlist_factor=2, **FAST)
    with pytest.raises(ValueError, match="shortlist_factor > 0 with order=2"):
        _select(pool, target, model, budget=4, order=2, shortlist_factor=2)
    run = compute_scores(pool, target, model=network, tokenizer=tokenizer, num_landmarks=8, **FAST)
    assert "shortlist_rows" not in run.details["landmarks"]  # None: no shortlist without a budget


@pytest.mark.parametrize(("options", "rows", "budget", "remedy"), [
    ({"num_landmarks": 30, "exact_gradient_fraction": None}, 300, None, "Raise num_landmarks (now 30)"),
    ({}, 4096, 104, "Raise exact_gradient_fraction (now 0.14: it caps the landmarks at 143 of num_landmarks=4096)"),
    ({"shortlist_factor": 0}, 4096, 104, "caps the landmarks at 573 of"),
    ({"num_landmarks": 8, "shortlist_factor": 100, "exact_gradient_fraction": None}, 64, 4, None),  # all shortlisted
    ({"num_landmarks": 64, "exact_gradient_fraction": None}, 64, 4, None),  # every row a landmark
])
def test_the_low_fidelity_warning_names_the_option_that_limits_the_landmarks(options, rows, budget, remedy):
    from hf_influence.methods.influence_distillation import exact_gradient_plan, fidelity_remedy

    config = InfluenceDistillationConfig(**options)
    got = fidelity_remedy(config, exact_gradient_plan(config, rows, budget), rows)
    assert got == remedy if remedy is None or remedy.startswith("Raise") else remedy in got


def test_low_landmark_fidelity_warns_and_names_num_landmarks(caplog):
    embeddings = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores = torch.randn(30, 3, generator=torch.Generator().manual_seed(1))  # unrelated to the embeddings
    regressor = LandmarkRegressor().fit(embeddings, scores)
    with caplog.at_level("WARNING", logger="hf_influence.methods.influence_distillation"):
        diagnostics = landmark_diagnostics(regressor, scores, num_pool_rows=300, calibrated=True,
                                           remedy="Raise num_landmarks (now 30)")
    assert diagnostics["loo_spearman"] < LOO_SPEARMAN_WARNING
    assert "Raise num_landmarks (now 30), or use method='influence_distillation_exact'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_influence.methods.influence_distillation"):  # nothing is left to the regression alone
        landmark_diagnostics(regressor, scores, num_pool_rows=300, calibrated=True, remedy=None)
    assert not caplog.text
    caplog.clear()
    smooth = embeddings[:, :1].expand(30, 3).float() * torch.tensor([1.0, 2.0, 3.0])  # a function of the embeddings
    with caplog.at_level("WARNING", logger="hf_influence.methods.influence_distillation"):
        diagnostics = landmark_diagnostics(LandmarkRegressor().fit(embeddings, smooth), smooth, 300, True)
    assert diagnostics["loo_spearman"] > 0.9 and caplog.text == ""
    # A regression that predicts one value for every landmark has no ranking: undefined, and it warns.
    flat = LandmarkRegressor().fit(embeddings, scores, ridge=1e6, bandwidth=1e-3)
    flat.loo = torch.full_like(flat.loo, 0.5)
    with caplog.at_level("WARNING", logger="hf_influence.methods.influence_distillation"):
        assert landmark_diagnostics(flat, scores, 300, True)["loo_spearman"] is None
    assert "leave-one-out Spearman undefined" in caplog.text


def test_selection_contract(pool, target, model):
    selected, table = _select(pool, target, model, budget=0.25)
    assert len(selected) == 5 and selected.column_names == pool.column_names
    assert len(set(selected["id"])) == 5
    again, _ = _select(pool, target, model, budget=0.25)
    assert again["id"] == selected["id"]
    provenance = table.provenance
    assert provenance["method"] == "influence_distillation" and provenance["budget"] == 5
    assert provenance["model_id"] and provenance["pool_fingerprint"] and provenance["target_fingerprint"]
    assert provenance["selected_pool_row_ids"] == [pool["id"].index(i) for i in selected["id"]]
    assert provenance["configs"]["InfluenceDistillationConfig"]["num_landmarks"] == 4096
    assert len(table) == len(pool) * len(target)


def test_score_table_round_trip(pool, target, model, tmp_path):
    _, table = _select(pool, target, model, budget=3, num_landmarks=6)
    loaded = ScoreTable.load(table.save(tmp_path / "scores"))
    assert loaded.provenance == table.provenance
    assert loaded.dataset.to_dict() == table.dataset.to_dict()


@pytest.mark.parametrize("method", ["less", "rds", "random"])
def test_baselines(pool, target, model, method):
    selected, table = _select(pool, target, model, budget=4, method=method)
    assert len(set(selected["id"])) == 4
    scores = table.to_matrix()[0]
    assert scores.shape == ((len(pool), 1) if method == "random" else (len(pool), len(target)))
    if method == "less":  # cosine similarities
        assert float(scores.abs().max()) <= 1.0 + 1e-5
    if method == "random":
        other, _ = _select(pool, target, model, budget=4, method=method, selection_seed=1)
        assert other["id"] != selected["id"]


@pytest.mark.parametrize("selection", ["round_robin_task", "mean_top_k", "less", "weighted"])
def test_selection_rules(pool, target, model, selection):
    selected, table = _select(pool, target, model, budget=5, num_landmarks=8, selection=selection)
    assert len(set(selected["id"])) == 5
    if selection == "weighted":
        weights = table.weights
        chosen = [pool["id"].index(i) for i in selected["id"]]
        assert bool((weights[chosen] > 0).all())
        assert weights.sum().item() == pytest.approx(len(pool), rel=1e-4)


@pytest.mark.parametrize("selection", ["round_robin", "round_robin_task", "mean_top_k", "less"])
@pytest.mark.parametrize("shortlist", [False, True], ids=["regression", "shortlist"])
def test_streamed_selection_equals_the_score_table_selection(pool, model, tmp_path, monkeypatch, selection, shortlist):
    """Without return_scores, first-order landmark ID streams: the scores stay a predictor over the JVP store, no
    [n, m] matrix or [n, e] embedding tensor is built, the pool is streamed once (with a shortlist too), and the
    rows and their order are those picked from the full score table."""
    from hf_influence.selection import streaming
    from hf_influence.selection.streaming import ScoreStream
    from hf_influence.extraction.store import VectorStore

    tasks = demo_target("math", 3, seed=1).remove_columns("task").add_column("task", ["a", "b", "a"])
    options = {"budget": 5, "num_landmarks": 6, "selection": selection, "work_dir": str(tmp_path),
               "selection_seed": 3}
    if shortlist:  # bound 10 of 20 rows: 6 landmarks and a shortlist of 4, fewer than the pool (kept in part)
        options |= {"exact_gradient_fraction": 0.5, "shortlist_factor": 1}
    selected, table = _select(pool, tasks, model, **options)
    assert table.provenance["details"]["exact_gradients"]["shortlist_rows"] == (4 if shortlist else 0)

    def no_matrix(*args, **kwargs):
        raise AssertionError("the streamed selection built the [n, m] score matrix")

    to_tensor = VectorStore.to_tensor

    def gradients_only(store, *args, **kwargs):  # landmark and target gradients are small; the pool side is not
        assert store.path.name != "jvp", "the streamed selection loaded the [n, e] JVP embeddings"
        return to_tensor(store, *args, **kwargs)

    passes = []
    blocks = streaming._blocks

    def counted(*args, **kwargs):
        passes.append(1)
        return blocks(*args, **kwargs)

    monkeypatch.setattr(ScoreStream, "scores", no_matrix)
    monkeypatch.setattr(VectorStore, "to_tensor", gradients_only)
    monkeypatch.setattr(streaming, "_blocks", counted)
    network, tokenizer = model
    streamed = select_by_influence(pool, tasks, model=network, tokenizer=tokenizer, **{**FAST, **options})
    assert streamed["id"] == selected["id"]
    assert len(passes) == 1
    if shortlist and selection == "round_robin":  # too many candidates to hold: a second pass, the same rows
        from hf_influence.methods import influence_distillation

        monkeypatch.setattr(influence_distillation, "ONE_PASS_MAX_CANDIDATES", 1)
        passes.clear()
        streamed = select_by_influence(pool, tasks, model=network, tokenizer=tokenizer, **{**FAST, **options})
        assert streamed["id"] == selected["id"] and len(passes) == 2


def test_users_models_are_left_as_they_were(pool, target):
    peft_model, tokenizer = lora_model(seed=0)
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    select_by_influence(pool, target, model=peft_model, tokenizer=tokenizer, budget=3, **FAST)
    for name, parameter in peft_model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    base, tokenizer = tiny_causal_lm("llama", seed=0)
    base.lm_head.weight.requires_grad_(False)  # a user's own freezing is kept, the rest stays trainable
    base_before = {name: p.detach().clone() for name, p in base.named_parameters()}
    flags_before = {name: p.requires_grad for name, p in base.named_parameters()}
    select_by_influence(pool, target, model=base, tokenizer=tokenizer, budget=3, **FAST)
    assert {name: p for name, p in base.named_parameters()}.keys() == base_before.keys()
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags_before
    assert not any("lora" in name for name, _ in base.named_modules())


@pytest.mark.slow
def test_a_peft_lora_config_is_accepted_as_trl_spells_it(pool, target):
    """peft_config=LoraConfig(...) (TRL's spelling, also in configs=[...]) gives a base model exactly the adapter of
    the equivalent flat options, other LoraConfig arguments included (rsLoRA changes the scores, so it is used)."""
    from peft import LoraConfig

    def scores(**options):
        base, tokenizer = tiny_causal_lm("llama", seed=0)
        _, table = select_by_influence(pool, target, model=base, tokenizer=tokenizer, budget=3, method="less",
                                       return_scores=True, **{**FAST, **options})
        return table.to_matrix()[0], table.provenance["configs"]["LoraSettings"]

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True,
                        task_type="CAUSAL_LM")
    by_peft, recorded = scores(peft_config=config)
    assert recorded["lora_r"] == 2 and recorded["lora_config_kwargs"] == {"use_rslora": True}
    by_flat, _ = scores(lora_r=2, lora_alpha=4, lora_target_modules=["q_proj", "v_proj"],
                        lora_config_kwargs='{"use_rslora": true}')
    torch.testing.assert_close(by_peft, by_flat, rtol=0, atol=0)
    by_configs, _ = scores(configs=[config])
    torch.testing.assert_close(by_peft, by_configs, rtol=0, atol=0)
    without_rslora, _ = scores(lora_r=2, lora_alpha=4, lora_target_modules=["q_proj", "v_proj"])
    assert not torch.allclose(by_peft, without_rslora)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'"):
        scores(peft_config=LoraConfig(r=2, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"\['use_rs_lora'\] are not peft.LoraConfig arguments"):
        scores(lora_config_kwargs={"use_rs_lora": True})


def test_input_require_grads_hooks_are_lifted_for_the_pass_and_restored(pool, target):
    # Trainers with adapters and gradient checkpointing add these hooks; functorch's jvp refuses them.
    base, tokenizer = tiny_causal_lm("llama", seed=0)
    base.enable_input_require_grads()
    select_by_influence(pool, target, model=base, tokenizer=tokenizer, budget=3, **FAST)
    assert len(base._require_grads_hooks) == 1
    embeddings = base.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeddings.requires_grad


@pytest.mark.parametrize("method", ["influence_distillation", "less", "rds", "random"])
def test_multi_process_selection_needs_a_shared_work_dir(pool, target, model, monkeypatch, method):
    """Methods that write stores (the registry's uses_stores) need one work_dir for all processes; random keeps
    none and runs."""
    import hf_influence.engine as engine_module

    network, tokenizer = model
    monkeypatch.setattr(engine_module, "process_state", lambda: object())  # as under accelerate launch
    if not hf_influence.METHODS[method].uses_stores:
        assert len(select_by_influence(pool, target, model=network, tokenizer=tokenizer, budget=3, method=method,
                                       **FAST)) == 3
        return
    with pytest.raises(ValueError, match="work_dir must be set when selecting under a multi-process launch"):
        select_by_influence(pool, target, model=network, tokenizer=tokenizer, budget=3, method=method, **FAST)


def test_dataset_method_is_registered_without_overwriting(pool, target, model, monkeypatch):
    network, tokenizer = model
    selected = pool.select_by_influence(target, model=network, tokenizer=tokenizer, budget=3, **FAST)
    assert len(selected) == 3
    sentinel = object()
    monkeypatch.setattr(datasets.Dataset, "select_by_influence", sentinel)
    register_dataset_method()
    assert datasets.Dataset.select_by_influence is sentinel


def test_work_dir_makes_a_rerun_reuse_its_stores(pool, target, model, tmp_path):
    first, table = _select(pool, target, model, budget=4, num_landmarks=8, work_dir=str(tmp_path))
    assert (tmp_path / "jvp").is_dir() and len(list(tmp_path.glob("landmark_gradients-*"))) == 1
    second, again = _select(pool, target, model, budget=4, num_landmarks=8, work_dir=str(tmp_path))
    assert first["id"] == second["id"]
    torch.testing.assert_close(table.to_matrix()[0], again.to_matrix()[0])
    # Other landmark settings on the same work_dir: their own landmark store beside the first (the paper's
    # algorithm and the default, compared on one warm-up and one set of features), not a store mismatch.
    _, other = _select(pool, target, model, budget=4, num_landmarks=6, shortlist_factor=0, work_dir=str(tmp_path))
    _, alone = _select(pool, target, lora_model(seed=0), budget=4, num_landmarks=6, shortlist_factor=0,
                       work_dir=str(tmp_path / "alone"))
    assert len(list(tmp_path.glob("landmark_gradients-*"))) == 2
    torch.testing.assert_close(other.to_matrix()[0], alone.to_matrix()[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["influence_distillation", "influence_distillation_exact"])
@pytest.mark.slow
def test_an_order_2_rerun_reads_its_hessian_products_back(pool, target, model, tmp_path, monkeypatch, method):
    """The target-Hessian products, order 2's dominant cost, are kept in work_dir: a rerun reads them (no
    Hessian-vector product at all) and scores the same; the store is what a fresh computation gives."""
    from hf_influence.extraction.hessian import TargetHessian

    options = {"budget": 4, "order": 2, "method": method, "optimizer_state": "gd", "step_size": 1e-3,
               **({"num_landmarks": 8} if method == "influence_distillation" else {})}
    _, first = _select(pool, target, model, **options, work_dir=str(tmp_path))
    assert len(list(tmp_path.glob("hessian_products-*"))) == 1

    def no_products(*args, **kwargs):
        raise AssertionError("a Hessian-vector product was computed again")

    monkeypatch.setattr(TargetHessian, "matmul", no_products)
    _, again = _select(pool, target, model, **options, work_dir=str(tmp_path))
    torch.testing.assert_close(first.weights, again.weights, rtol=0, atol=0)
    monkeypatch.undo()
    _, fresh = _select(pool, target, lora_model(seed=0), **options, work_dir=str(tmp_path / "fresh"))
    torch.testing.assert_close(first.weights, fresh.weights, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("optimizer_state", ["gd", "warmup"])
def test_landmark_runs_after_an_exact_run_read_its_gradients(pool, target, model, tmp_path, monkeypatch,
                                                             optimizer_state):
    """After an exact run on a work_dir, a landmark run reads its landmark gradients from the exact store (no
    model pass), and scores as a landmark run in a folder of its own does (finished_gradients' own test covers
    the settings that store does not serve)."""
    import hf_influence.methods.stores as stores

    options = {"budget": 4, "optimizer_state": optimizer_state}
    _, alone = _select(pool, target, lora_model(seed=0), **options, num_landmarks=8, work_dir=str(tmp_path / "alone"))
    shared = tmp_path / "shared"
    _select(pool, target, model, **options, method="influence_distillation_exact", work_dir=str(shared))
    computed = []
    monkeypatch.setattr(stores, "extract_gradients", lambda model, rows, *args, **kwargs: computed.append(len(rows))
                        or extract_gradients(model, rows, *args, **kwargs))
    _, reused = _select(pool, target, model, **options, num_landmarks=8, work_dir=str(shared))
    assert computed == [len(target)] and not list(shared.glob("landmark_gradients-*"))  # only the target's rows
    torch.testing.assert_close(reused.to_matrix()[0], alone.to_matrix()[0], rtol=1e-4, atol=1e-6)


def test_one_work_dir_serves_several_targets_and_keeps_the_warm_up(pool, target, model, tmp_path, monkeypatch):
    import importlib

    warmup_module = importlib.import_module("hf_influence.optimizer_warmup")  # the package attribute is the function
    other_target = demo_target("code", 3, seed=2)
    options = {"budget": 4, "num_landmarks": 8, "optimizer_state": "warmup"}
    _, reference = _select(pool, other_target, lora_model(seed=0), **options, work_dir=str(tmp_path / "alone"))
    shared = tmp_path / "shared"
    _, first = _select(pool, target, model, **options, work_dir=str(shared))
    assert (shared / "warmup" / "warmup.json").is_file()
    pool_side = {path: path.stat().st_mtime_ns for folder in ("jvp", *shared.glob("landmark_gradients-*"))
                 for path in (shared / folder).rglob("*") if path.is_file() and path.name != "manifest.json"}

    def no_training(*args, **kwargs):
        raise AssertionError("the saved warm-up should have been loaded")

    monkeypatch.setattr(warmup_module, "_make_trainer", no_training)
    # A second target in the same folder: the saved warm-up and the pool-side stores are reused untouched, only
    # its own target gradients are extracted, and its scores are those of a run in a folder of its own.
    _, other = _select(pool, other_target, model, **options, work_dir=str(shared))
    assert {path: path.stat().st_mtime_ns for path in pool_side} == pool_side
    assert len(list(shared.glob("target_gradients-*"))) == 2
    assert torch.equal(other.to_matrix()[0], reference.to_matrix()[0])
    assert torch.equal(other.weights, reference.weights)
    _, again = _select(pool, target, model, **options, work_dir=str(shared))
    assert torch.equal(again.to_matrix()[0], first.to_matrix()[0])


def test_a_refused_run_leaves_the_saved_warm_up_and_stores_untouched(pool, target, tmp_path, monkeypatch):
    """Another pool on a used work_dir is refused before any training, and the saved warm-up and stores keep
    their bytes; overwrite=True replaces them deliberately."""
    import importlib

    warmup_module = importlib.import_module("hf_influence.optimizer_warmup")
    options = {"budget": 4, "num_landmarks": 8, "optimizer_state": "warmup", "work_dir": str(tmp_path)}
    _select(pool, target, lora_model(seed=0), **options)
    def stored():  # the work_dir's data; the lock's holder file names each run that held it
        return {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and "lock" not in path.name}

    saved = stored()
    original = warmup_module._make_trainer

    def no_training(*args, **kwargs):
        raise AssertionError("a refused run must not train")

    monkeypatch.setattr(warmup_module, "_make_trainer", no_training)
    other_pool = pool.select(range(12))
    with pytest.raises(hf_influence.WarmupMismatchError, match=r"differs from this run in: pool rows .*overwrite=True"):
        _select(other_pool, target, lora_model(seed=0), **options)
    assert stored() == saved
    monkeypatch.setattr(warmup_module, "_make_trainer", original)
    selected, _ = _select(other_pool, target, lora_model(seed=0), **options, overwrite=True)
    assert len(selected) == 4
    assert (tmp_path / "warmup" / "optimizer.safetensors").read_bytes() != saved[tmp_path / "warmup" / "optimizer.safetensors"]


def test_a_work_dir_refuses_a_model_with_other_weights(pool, target, tmp_path):
    """A model id or class says nothing of the weights: an in-memory model with other base weights, or a local
    folder whose weights were replaced at the same path, is refused on a work_dir made with the first one (the
    old code returned the first model's scores byte for byte)."""
    network, tokenizer = lora_model(seed=0)
    options = {"budget": 4, "num_landmarks": 8, "optimizer_state": "gd", "work_dir": str(tmp_path / "memory")}
    _select(pool, target, (network, tokenizer), **options)
    with torch.no_grad():
        next(p for name, p in network.named_parameters() if "lora_" not in name and p.ndim == 2).add_(0.01)
    with pytest.raises(hf_influence.StoreMismatchError, match="weights_digest"):
        _select(pool, target, (network, tokenizer), **options)

    folder = tmp_path / "model"
    for seed in (0, 1):
        base, base_tokenizer = tiny_causal_lm(seed=seed)
        base.save_pretrained(folder)
        base_tokenizer.save_pretrained(folder)
        run = lambda: select_by_influence(pool, target, model=str(folder), budget=4, num_landmarks=8,
                                          work_dir=str(tmp_path / "folder"), **FAST)
        if seed == 0:
            run()
        else:  # the same path, other weights: the saved warm-up (the first thing keyed by the model) refuses
            with pytest.raises(hf_influence.WarmupMismatchError, match="model weights"):
                run()


def test_bad_inputs(pool, target, model):
    network, tokenizer = model

    def run(pool_rows=pool, target_rows=target, **options):
        return select_by_influence(pool_rows, target_rows, model=network, tokenizer=tokenizer,
                                   **{**FAST, "budget": 3, **options})

    with pytest.raises(SelectionError, match="pool is empty"):
        run(pool_rows=pool.select([]))
    with pytest.raises(SelectionError, match="target is empty"):
        run(target_rows=[])
    with pytest.raises(SelectionError, match="budget 50 is larger than the pool"):
        run(budget=50)
    empty_answer = target.map(lambda row, index: {"solution": "" if index == 1 else row["solution"]},
                              with_indices=True)
    with pytest.raises(ValueError, match=r"Target rows cannot be scored.*1"):
        run(target_rows=empty_answer, response_column="solution")
    with pytest.raises(FormattingError):
        run(target_rows=target.remove_columns(["prompt"]))
    with pytest.raises(TypeError, match="num_landmark"):
        run(num_landmark=3)
    with pytest.raises(ValueError, match="method"):
        run(method="magic")
    with pytest.raises(ValueError, match="weighted"):
        run(method="less", selection="weighted")
    with pytest.raises(ValueError, match="tokenizer"):
        select_by_influence(pool, target, model=network, budget=3)
    with pytest.raises(ValueError, match="step_size"):
        run(optimizer_state="gd", order=2)


def test_public_api_exports_what_readme_documents():
    """Every name of __all__ is defined in the package, and every object README's API table names at the start of
    a row is exported (the README is the API's documentation: a rename must show up here)."""
    import re
    from pathlib import Path

    for name in hf_influence.__all__:
        value = getattr(hf_influence, name)
        if callable(value):
            assert value.__module__.startswith("hf_influence."), name
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    api = readme.split("## API", 1)[1].split("\n## ", 1)[0]
    documented = {name for row in api.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`([A-Za-z_]+)[`(]", row.split("|")[1]) if "." not in name}
    documented -= {"method", "oracles", "methods", "weights"}  # rows about options, not objects
    assert documented and documented <= set(hf_influence.__all__), documented - set(hf_influence.__all__)


def _decayed_adamw(model, with_scheduler: bool):
    """An AdamW with state on every LoRA parameter, its learning rate decayed to 0 (a finished linear schedule)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step)) if with_scheduler else None
    for parameter in parameters:  # one step's worth of state
        parameter.grad = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 1e-2
    optimizer.step()
    optimizer.zero_grad()
    if scheduler is not None:
        scheduler.step()
    else:
        optimizer.param_groups[0]["lr"] = 0.0
    assert optimizer.param_groups[0]["lr"] == 0.0
    return optimizer


@pytest.mark.slow
def test_second_order_with_a_decayed_learning_rate_uses_half_the_initial_rate(pool, target, caplog):
    network, tokenizer = lora_model(seed=0)
    optimizer = _decayed_adamw(network, with_scheduler=True)
    options = {**FAST, "budget": 4, "order": 2, "num_landmarks": 20, "return_scores": True}
    with caplog.at_level("WARNING", logger="hf_influence.methods.influence_distillation"):
        _, fallback = select_by_influence(pool, target, model=network, tokenizer=tokenizer, optimizer=optimizer, **options)
    assert "initial_lr / 2 = 0.0005" in caplog.text
    _, explicit = select_by_influence(pool, target, model=network, tokenizer=tokenizer, optimizer=optimizer,
                                      step_size=5e-4, **options)
    torch.testing.assert_close(fallback.weights, explicit.weights)
    _, first = select_by_influence(pool, target, model=network, tokenizer=tokenizer, optimizer=optimizer,
                                   **{**options, "order": 1})
    assert not torch.allclose(fallback.weights, first.weights)  # the second-order term did not vanish
    with pytest.raises(ValueError, match="learning rate is 0 and it records no initial_lr"):
        select_by_influence(pool, target, model=network, tokenizer=tokenizer,
                            optimizer=_decayed_adamw(network, with_scheduler=False), **options)


def test_rds_is_the_cosine_of_pooled_embeddings_and_reuses_the_pool_store(pool, target, tmp_path, monkeypatch):
    """RDS+ scores are the cosine of the base model's pooled embeddings (brute force: lm_pooled_embeddings of each
    side), and a second target on the same work_dir reads the pool's embeddings from the store."""
    from hf_influence.extraction import extract
    from hf_influence.formatting import FormattingConfig, format_dataset
    from hf_influence.rds_embeddings import lm_pooled_embeddings

    network, tokenizer = tiny_causal_lm(seed=0)
    _, table = select_by_influence(pool, target, model=network, tokenizer=tokenizer, return_scores=True,
                                   method="rds", budget=4, work_dir=str(tmp_path), show_progress=False)
    formatting = FormattingConfig()
    pool_rows = format_dataset(pool, tokenizer, formatting, show_progress=False).dataset
    target_rows = format_dataset(target, tokenizer, formatting, show_progress=False).dataset
    pad = tokenizer.pad_token_id
    expected = (lm_pooled_embeddings(network, pool_rows, pad_token_id=pad, show_progress=False)
                @ lm_pooled_embeddings(network, target_rows, pad_token_id=pad, show_progress=False).T)
    torch.testing.assert_close(table.to_matrix()[0].float(), expected, rtol=1e-4, atol=1e-5)

    embedded = []  # rows embedded by either path (the pool's store or the in-memory target pass)

    def counting(original):
        def pooled(decoder, batch, *args):
            embedded.append(len(batch["input_ids"]))
            return original(decoder, batch, *args)
        return pooled

    from hf_influence import rds_embeddings
    monkeypatch.setattr(extract, "pooled_batch", counting(extract.pooled_batch))
    monkeypatch.setattr(rds_embeddings, "pooled_batch", counting(rds_embeddings.pooled_batch))
    other = demo_target("code", 2, seed=3)
    _, other_table = select_by_influence(pool, other, model=network, tokenizer=tokenizer, return_scores=True,
                                         method="rds", budget=4, work_dir=str(tmp_path), show_progress=False)
    assert other_table.to_matrix()[0].shape == (len(pool), len(other))
    assert sum(embedded) == len(other)  # only the new target's rows went through the model


def test_rds_and_lm_landmark_features_share_the_base_models_store(pool, target, tmp_path):
    """RDS+ represents rows by the base model (a PEFT adapter is off for pool and target, with or without a
    work_dir), and a landmark run with landmark_features="lm" after a warm-up (which trains the adapter) reads
    the same pool store on the same work_dir instead of refusing it."""
    from hf_influence.formatting import FormattingConfig, format_dataset
    from hf_influence.rds_embeddings import lm_pooled_embeddings

    network, tokenizer = lora_model(seed=0)  # random A and B: the adapter changes the hidden states
    _, stored = _select(pool, target, (network, tokenizer), method="rds", budget=4, work_dir=str(tmp_path))
    _, in_memory = _select(pool, target, (network, tokenizer), method="rds", budget=4)
    formatting = FormattingConfig()
    with network.disable_adapter():
        pool_rows, target_rows = (lm_pooled_embeddings(network, format_dataset(rows, tokenizer, formatting,
                                                                               show_progress=False).dataset,
                                                       pad_token_id=tokenizer.pad_token_id, show_progress=False)
                                  for rows in (pool, target))
    for table in (stored, in_memory):
        torch.testing.assert_close(table.to_matrix()[0].float(), pool_rows @ target_rows.T, rtol=1e-4, atol=1e-5)
    written = {path: path.stat().st_mtime_ns for path in (tmp_path / "lm_embeddings").iterdir()
               if path.name != "manifest.json"}
    _select(pool, target, (network, tokenizer), budget=4, num_landmarks=8, landmark_features="lm",
            optimizer_state="warmup", work_dir=str(tmp_path))
    assert {path: path.stat().st_mtime_ns for path in written} == written


def test_less_is_the_cosine_of_the_preconditioned_gradients(pool, target):
    """LESS scores are cosines of the Adam-preconditioned LoRA gradients: with unit-normalised gradients, exactly
    the first-order scores of exact Influence Distillation after the same warm-up (which test_gradients checks
    against a per-sample autograd loop); its rule is the mean within each target task, then the best task."""
    import datasets

    two_tasks = datasets.concatenate_datasets([target, demo_target("code", 2, seed=4)])
    _, less_table = _select(pool, two_tasks, lora_model(seed=0), budget=5, method="less")
    _, exact_table = _select(pool, two_tasks, lora_model(seed=0), budget=5, method="influence_distillation_exact")
    less_scores, rows, targets = less_table.to_matrix()
    torch.testing.assert_close(less_scores, exact_table.to_matrix()[0], rtol=1e-5, atol=1e-6)
    tasks = less_table.provenance["target_tasks"]
    by_task = {task: less_scores[:, [i for i, name in enumerate(targets) if tasks[name] == task]].mean(1)
               for task in set(tasks.values())}
    keys = torch.stack(list(by_task.values())).amax(0)
    expected = keys.double().sort(descending=True, stable=True).indices[:5].tolist()
    assert less_table.provenance["selected_pool_row_ids"] == [rows[i] for i in expected]


def test_warmup_gd_takes_plain_gradients_at_the_warmed_up_weights(pool, target, model):
    """optimizer_state="warmup_gd": the warm-up moves the weights, then no preconditioning. Brute force: the same
    warm-up run by hand, then plain gradient descent ("gd") on the warmed-up model gives the same scores; they
    differ from Adam's ("warmup") and from the unwarmed model's ("gd")."""
    from hf_influence import WarmupConfig, warmup
    from hf_influence.formatting import FormattingConfig, format_dataset

    exact = {"method": "influence_distillation_exact", "budget": 4}
    _, table = _select(pool, target, model, optimizer_state="warmup_gd", **exact)
    warmed, tokenizer = lora_model(seed=0)
    warmup(warmed, tokenizer, format_dataset(pool, tokenizer, FormattingConfig(), show_progress=False),
           WarmupConfig(warmup_fraction=FAST["warmup_fraction"], warmup_min_steps=FAST["warmup_min_steps"]))
    _, by_hand = _select(pool, target, (warmed, tokenizer), optimizer_state="gd", **exact)
    torch.testing.assert_close(table.to_matrix()[0], by_hand.to_matrix()[0], rtol=1e-5, atol=1e-7)
    for other in ("warmup", "gd"):
        _, different = _select(pool, target, lora_model(seed=0), optimizer_state=other, **exact)
        assert not torch.allclose(table.to_matrix()[0], different.to_matrix()[0], rtol=1e-3, atol=1e-6), other
