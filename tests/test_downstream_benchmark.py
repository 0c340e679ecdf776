"""The downstream benchmark's machinery (benchmarks/downstream.py) on a tiny model: its statistics against a
brute-force computation, resume after an interrupted run, the same pool and evaluation rows for every method,
and evaluation rows that never overlap selection rows."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import downstream  # noqa: E402

from hf_influence.demo import demo_pool, demo_target  # noqa: E402
from hf_influence.store import fingerprint_dataset  # noqa: E402
from hf_influence.testing import tiny_causal_lm  # noqa: E402

# Student t quantiles t_{0.975, df} from a printed table, so the interval is checked against numbers that do
# not come from the code under test.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571}


def test_interval_is_the_t_interval_of_the_mean():
    values = [0.3, -0.1, 0.25, 0.05, -0.2, 0.4]
    mean = sum(values) / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    got_mean, got_std, ci = downstream.interval(values)
    assert got_mean == pytest.approx(mean) and got_std == pytest.approx(std)
    half = T_975[5] * std / math.sqrt(6)
    assert ci == pytest.approx([mean - half, mean + half], abs=1e-3)
    assert downstream.interval([0.7]) == (0.7, 0.0, None)


def test_paired_difference_against_random_by_training_seed():
    before = 2.0
    after = {  # method -> {(selection seed, training seed): loss after}
        "random": {(0, 0): 1.9, (1, 0): 1.8, (0, 1): 1.95, (1, 1): 1.75, (0, 2): 1.7, (1, 2): 1.9},
        "rds": {(0, 0): 1.6, (0, 1): 1.7, (0, 2): 1.5},
    }
    runs = {m: [{"selection_seed": s, "train_seed": t, "target_loss_after": v, "train_seconds": 1.0}
                for (s, t), v in values.items()] for m, values in after.items()}
    selections = {m: [{"selection_seconds": 2.0}] for m in after}
    report = downstream.summarize_target(runs, selections, before)["methods"]
    # Brute force: per training seed, rds's change minus the mean of random's changes at that seed.
    paired = []
    for t in range(3):
        random_changes = [v - before for (s, seed), v in after["random"].items() if seed == t]
        paired.append(after["rds"][(0, t)] - before - sum(random_changes) / len(random_changes))
    mean = sum(paired) / 3
    std = math.sqrt(sum((p - mean) ** 2 for p in paired) / 2)
    assert report["rds"]["diff_vs_random_mean"] == pytest.approx(mean)
    assert report["rds"]["diff_vs_random_ci95"] == pytest.approx(
        [mean - T_975[2] * std / math.sqrt(3), mean + T_975[2] * std / math.sqrt(3)], abs=1e-3)
    random_changes = [v - before for v in after["random"].values()]
    random_mean = sum(random_changes) / 6
    random_std = math.sqrt(sum((c - random_mean) ** 2 for c in random_changes) / 5)
    rds_mean = sum(v - before for v in after["rds"].values()) / 3
    assert report["rds"]["sd_below_random"] == pytest.approx((random_mean - rds_mean) / random_std)
    assert report["random"]["diff_vs_random_mean"] == pytest.approx(0.0, abs=1e-12)
    assert report["random"]["loss_change_mean"] == pytest.approx(random_mean)


def test_evaluation_rows_never_overlap_selection_rows():
    selection = Dataset.from_dict({"id": ["a", "b"], "prompt": ["p1", "p2"]})
    # "c" repeats a selection prompt under another id; "b" repeats an id.
    candidates = Dataset.from_dict({"id": ["b", "c", "d", "e", "f"], "prompt": ["x", "p1", "p3", "p4", "p5"]})
    evaluation = downstream.disjoint_evaluation(selection, candidates, 3, seed=0)
    assert sorted(evaluation["id"]) == ["d", "e", "f"]
    with pytest.raises(ValueError, match="only 3 evaluation rows are left"):
        downstream.disjoint_evaluation(selection, candidates, 4, seed=0)


def _tiny_setup():
    pool = demo_pool(6, seed=0)  # 24 rows
    selection = demo_target("math", 3, seed=1)
    candidates = demo_target("math", 12, seed=2)
    data = downstream.BenchmarkData(pool, {"math": (selection,
                                                    downstream.disjoint_evaluation(selection, candidates, 4, seed=1)),
                                           "code": (demo_target("code", 2, seed=1), demo_target("code", 3, seed=5))})
    settings = downstream.Settings(
        pool_rows=len(pool), max_length=128, budget=4, num_landmarks=8, targets=("math", "code"),
        methods=("influence_distillation:selection=mean_top_k", "rds", "random"), random_seeds=2, train_seeds=2, max_steps=2,
        batch_size=2, lora_r=2,
        options={"num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "projection_dim": 256,
                 "jvp_projection_dim": 128})
    return data, settings


def _loader():
    return tiny_causal_lm(seed=0)


def test_benchmark_runs_every_method_on_the_same_rows_and_resumes(tmp_path, monkeypatch):
    data, settings = _tiny_setup()
    seen = {"pool": set(), "evaluation": {}}
    select_by_influence, target_loss = downstream.select_by_influence, downstream.target_loss

    def recording_select(pool, target, **kwargs):
        seen["pool"].add(fingerprint_dataset(pool))
        return select_by_influence(pool, target, **kwargs)

    def recording_loss(model, tokenizer, rows, formatting):
        seen["evaluation"].setdefault(fingerprint_dataset(rows), 0)
        seen["evaluation"][fingerprint_dataset(rows)] += 1
        return target_loss(model, tokenizer, rows, formatting)

    monkeypatch.setattr(downstream, "select_by_influence", recording_select)
    monkeypatch.setattr(downstream, "target_loss", recording_loss)
    log = downstream.run_benchmark(data, settings, tmp_path / "full", _loader)
    assert len(seen["pool"]) == 1  # one pool for every method and target
    runs_per_target = (1 + 1 + settings.random_seeds) * settings.train_seeds
    # Per target one evaluation set, scored before training and after every run.
    assert sorted(seen["evaluation"].values()) == [1 + runs_per_target] * 2
    report = downstream.summarize(log, settings)
    for target in ("math", "code"):
        methods = report[target]["methods"]
        assert set(methods) == {"influence_distillation:selection=mean_top_k", "rds", "random"}
        assert len(methods["random"]["runs"]) == 4 and len(methods["rds"]["runs"]) == 2
        for method in methods.values():
            assert method["diff_vs_random_ci95"] is not None and method["loss_change_ci95"] is not None
    # Two random draws select different rows; a training seed changes the result of one selection.
    draws = report["math"]["methods"]["random"]["selections"]
    assert draws[0]["selected_pool_row_ids"] != draws[1]["selected_pool_row_ids"]
    rds_runs = report["math"]["methods"]["rds"]["runs"]
    assert rds_runs[0]["target_loss_after"] != rds_runs[1]["target_loss_after"]

    # Interrupted run: the fifth training run crashes. The rerun does only what is missing (no selection is
    # recomputed) and its report equals the uninterrupted one's.
    train, calls = downstream.train, {"n": 0}

    def crashing_train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(downstream, "train", crashing_train)
    with pytest.raises(KeyboardInterrupt):
        downstream.run_benchmark(data, settings, tmp_path / "crash", _loader)
    finished = json.loads((tmp_path / "crash" / "runs.json").read_text())["results"]
    assert sum("/train-" in key for key in finished) == 4
    selections_before = {k for k in finished if k.endswith(("selection-0", "selection-1"))}
    monkeypatch.setattr(downstream, "train", train)
    resumed = downstream.run_benchmark(data, settings, tmp_path / "crash", _loader)
    again = downstream.summarize(resumed, settings)
    for target in report:
        for method, row in report[target]["methods"].items():
            other = again[target]["methods"][method]
            assert [r["target_loss_after"] for r in other["runs"]] == [r["target_loss_after"] for r in row["runs"]]
            assert [s["selected_pool_row_ids"] for s in other["selections"]] == \
                [s["selected_pool_row_ids"] for s in row["selections"]]
    assert selections_before <= set(resumed.data["results"])

    # Other settings on the same cache are refused, not mixed in; fewer seeds and methods read a subset of the
    # finished runs without computing anything.
    with pytest.raises(ValueError, match="max_steps differ"):
        downstream.run_benchmark(data, replace(settings, max_steps=3), tmp_path / "full", _loader)
    monkeypatch.setattr(downstream, "train", crashing_train)
    calls["n"] = 4  # the next training call would raise
    subset = replace(settings, methods=("rds", "random"), random_seeds=1, train_seeds=1)
    small = downstream.summarize(downstream.run_benchmark(data, subset, tmp_path / "full", _loader), subset)
    assert small["math"]["methods"]["rds"]["runs"] == report["math"]["methods"]["rds"]["runs"][:1]


def test_method_variants():
    assert downstream.parse_method("rds") == ("rds", {})
    assert downstream.parse_method("influence_distillation:selection=mean_top_k,num_landmarks=64") == (
        "influence_distillation", {"selection": "mean_top_k", "num_landmarks": 64})
    with pytest.raises(ValueError, match="unknown method 'lesss'"):
        downstream.parse_method("lesss")
    with pytest.raises(ValueError, match="option=value"):
        downstream.parse_method("rds:selection")


def test_variants_that_change_the_model_side_passes_get_stores_of_their_own(tmp_path):
    """Selection-only options share the stores; warm-up, gradient or formatting options (and optimizer_state)
    get a sibling folder per distinct setting, so they never meet the shared stores made with the defaults."""
    work = tmp_path / "work"
    for variant in ({}, {"selection": "mean_top_k", "num_landmarks": 512, "shortlist_factor": 0}):
        assert downstream.variant_work_dir(work, variant) == work
    longer = downstream.variant_work_dir(work, {"warmup_epochs": 4, "num_landmarks": 512})
    assert longer.parent == tmp_path and longer != work
    assert longer == downstream.variant_work_dir(work, {"num_landmarks": 64, "warmup_epochs": 4})
    assert downstream.variant_work_dir(work, {"warmup_epochs": 2}) not in (work, longer)
    assert downstream.variant_work_dir(work, {"optimizer_state": "gd"}) != work
