"""The signal study (benchmarks/signal_study.py) on a tiny model: each configuration keeps its own stores, the derived
configurations are their parts' scores combined as the pre-registration says (checked by brute force), the decision
rule on made-up summaries, and fresh rows disjoint from the downstream benchmark of record's."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import downstream  # noqa: E402
import signal_study  # noqa: E402

from hf_influence.demo import demo_pool, demo_target  # noqa: E402
from hf_influence.testing import tiny_causal_lm  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
REGISTRATION = {"commit": "test", "uncommitted_changes": False, "sha256": "a"}


def _loader():
    return tiny_causal_lm(seed=0)


@pytest.mark.slow
def test_configurations_keep_their_own_stores_and_derived_rows_combine_their_parts(tmp_path):
    def rows(domain, count, seed):
        target = demo_target(domain, count, seed=seed)
        return target.map(lambda row: {"completion": row["solution"]}).remove_columns(["answer", "solution"])

    data = downstream.BenchmarkData(demo_pool(6, seed=0), {"math": (rows("math", 3, 1), rows("math", 4, 2))})
    names = ("random", "exact", "no_normalize", "token_sum", "lora_mlp", "warmup_2", "warmup_3", "warmup_4",
             "checkpoints_4")
    table = {name: replace(signal_study.METHODS[name], draws=1) for name in names}
    settings = signal_study.study_settings(
        pool_rows=24, max_length=128, budget=4, batch_size=2, lora_r=2, targets=("math",), methods=names,
        bootstrap_resamples=200, method_table=table,
        options={"warmup_fraction": 0.25, "warmup_min_steps": 2, "projection_dim": 256})
    cache = tmp_path / "study"
    log = downstream.run_benchmark(data, settings, cache, _loader, REGISTRATION, signal_study.selector)

    # A LoRA change is another adapter: its own warm-up and gradient store, of another width.
    exact_store = cache / "configs" / "exact" / "work" / "draw-0"
    mlp_store = cache / "configs" / "lora_mlp" / "work" / "draw-0"
    assert (exact_store / "pool_gradients").is_dir() and (mlp_store / "pool_gradients").is_dir()
    exact_table = downstream.ScoreTable.load(cache / "configs" / "exact" / "tables" / "math" / "exact-0")
    mlp_table = downstream.ScoreTable.load(cache / "configs" / "lora_mlp" / "tables" / "math" / "lora_mlp-0")
    assert not torch.equal(exact_table.to_matrix()[0], mlp_table.to_matrix()[0])

    # token_sum: no_normalize's scores times each row's response-token count, exact ID's rule.
    plain = downstream.ScoreTable.load(cache / "configs" / "no_normalize" / "tables" / "math" / "no_normalize-0")
    scores, row_ids, _ = plain.to_matrix()
    _, tokenizer = _loader()
    counts = signal_study.response_tokens(data, settings, tokenizer)
    assert counts.min() >= 1 and len(set(counts.tolist())) > 1  # rows differ in length: the scaling matters
    expected = downstream.select_indices(scores.double() * counts[row_ids][:, None], 4,
                                         rule=plain.provenance["selection"], seed=0)
    assert log.get("math/token_sum/draw-0")["selected_pool_row_ids"] == [row_ids[i] for i in expected.tolist()]

    # checkpoints_4: the mean of the four warm-up lengths' scores; the warm-ups differ, so do their scores.
    parts = [downstream.ScoreTable.load(signal_study.config_root(cache, name) / "tables" / "math" / f"{name}-0")
             .to_matrix()[0].double() for name in ("exact", "warmup_2", "warmup_3", "warmup_4")]
    assert not torch.equal(parts[0], parts[3])
    expected = downstream.select_indices(torch.stack(parts).mean(0), 4, rule=exact_table.provenance["selection"],
                                         seed=0)
    assert log.get("math/checkpoints_4/draw-0")["selected_pool_row_ids"] == [row_ids[i] for i in expected.tolist()]
    report = downstream.summarize(log, settings)["math"]["methods"]
    assert set(report) == set(names) and "vs_exact_ci95" in report["lora_mlp"]


def _summary(differences: dict[str, list[tuple[float, float]]], means: dict[str, float]) -> dict:
    """Targets as downstream.summarize gives them, with made-up intervals against `exact` per configuration."""
    targets = {}
    for index, target in enumerate(("gsm8k", "mmlu", "codealpaca")):
        methods = {"exact": {"loss_change_mean": -0.1, "effect_size_vs_random": -3.0, "vs_rds_ci95": [-0.1, 0.1]}}
        for name, intervals in differences.items():
            methods[name] = {"loss_change_mean": means[name], "vs_exact_ci95": list(intervals[index]),
                             "effect_size_vs_random": -1.0, "vs_rds_ci95": [0.1, 0.2]}
        targets[target] = {"methods": methods}
    return targets


def test_decision_rule():
    below, straddle, above = (-0.2, -0.1), (-0.1, 0.1), (0.1, 0.2)
    # lora_all is below on 2 of 3 targets and above on none; srht_32k is below on all 3; sgd is above on one;
    # rank_32 is below on one only.
    targets = _summary({"lora_all": [below, below, straddle], "srht_32k": [below, below, below],
                        "sgd": [below, below, above], "rank_32": [below, straddle, straddle]},
                       {"lora_all": -0.3, "srht_32k": -0.25, "sgd": -0.5, "rank_32": -0.6})
    decision = signal_study.decide(targets)
    assert set(decision["beats_default"]) == {"lora_all", "srht_32k"}  # sgd is worse somewhere, rank_32 once only
    assert decision["chosen"] == "lora_all"  # the lowest mean change among those that beat the default
    assert decision["bar"]["gsm8k"] == {"2sd_better_than_random": False, "within_or_better_than_rds": False}
    # None beats it: the default stays, and its own bar is read.
    kept = signal_study.decide(_summary({"rank_32": [straddle] * 3}, {"rank_32": -0.9}))
    assert kept["chosen"] == "exact" and kept["bar_met"] is True
    assert signal_study.decide({"gsm8k": {}})["decided"] is False


def test_preregistration_is_the_docstring_part_and_names_the_untuned_task():
    text = downstream.preregistration(signal_study.__doc__)
    assert text.startswith("PRE-REGISTRATION") and "Decision rule" in text and "END OF" not in text
    assert "Code Alpaca" in text and "never tuned on" in text
    assert set(signal_study.CONFIGS) | set(signal_study.BASELINES) == set(signal_study.METHODS)
    for name in signal_study.METHODS:
        assert name in text, f"{name} is run but not pre-registered"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA_DIR / "pool.jsonl.gz").exists(), reason="needs ../shared/data")
def test_fresh_rows_miss_the_benchmark_of_records_rows():
    settings = signal_study.study_settings(pool_rows=256, selection_rows=20, eval_rows=40)
    data = signal_study.load_data(DATA_DIR, settings)
    assert data.overlap_check["clean"], data.overlap_check
    v2 = downstream.load_data(DATA_DIR, downstream.Settings())
    v2_ids = set(v2.pool["id"]) | {i for rows in v2.targets.values() for part in rows for i in part["id"]}
    assert not set(data.pool["id"]) & v2_ids
    for name, (selection, evaluation) in data.targets.items():
        assert len(selection) == 20 and len(evaluation) == 40
        assert not (set(selection["id"]) | set(evaluation["id"])) & (v2_ids | set(data.pool["id"]))
    for part in data.targets["codealpaca"]:  # Code Alpaca rows of the pool file, outside the pool slice
        assert all(row_id.startswith(signal_study.CODE_SOURCE) for row_id in part["id"])
        assert all(prompt and completion for prompt, completion in zip(part["prompt"], part["completion"]))
