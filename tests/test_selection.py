"""Tests for hf_influence.selection.rules: rules against brute-force references, streaming == in-memory, errors."""

import math

import numpy as np
import pytest
import torch

from hf_influence.selection import rules as selection
from hf_influence.selection.rules import (
    GROUPED_RULES,
    RULE_TABLE,
    RULES,
    SelectionError,
    choose_rows,
    parse_budget,
    resolve_budget,
    select_indices,
    top_candidates,
    weighted_sample,
)

LABELS = ("b", "a", "c")  # deliberately not in sorted order


# ---- brute-force references: plain loops over a list-of-lists matrix -------------------------------------


def _task_matrix(scores, groups):
    """Mean of each row over each task's columns, tasks in sorted label order -> list of lists."""
    tasks = sorted(set(groups))
    out = []
    for row in scores:
        means = []
        for task in tasks:
            total, count = 0.0, 0
            for value, label in zip(row, groups):
                if label == task:
                    total += value
                    count += 1
            means.append(total / count)
        out.append(means)
    return out


def ref_round_robin(scores, budget, seed, groups=None):
    matrix = scores if groups is None else _task_matrix(scores, groups)
    n, c = len(matrix), len(matrix[0])
    generator = torch.Generator().manual_seed(seed)
    picked = []
    while len(picked) < budget:
        for column in torch.randperm(c, generator=generator).tolist():
            best = None
            for row in range(n):
                if row not in picked and (best is None or matrix[row][column] > matrix[best][column]):
                    best = row
            picked.append(best)
            if len(picked) == budget:
                break
    return picked


def ref_top_k(keys, budget):
    return sorted(range(len(keys)), key=lambda row: (-keys[row], row))[:budget]


def ref_mean_top_k(scores, budget):
    return ref_top_k([row[0] for row in _task_matrix(scores, [0] * len(scores[0]))], budget)


def ref_less(scores, budget, groups=None):
    groups = list(range(len(scores[0]))) if groups is None else groups
    return ref_top_k([max(row) for row in _task_matrix(scores, groups)], budget)


def reference(rule, scores, budget, seed, groups):
    rows = scores.tolist()
    if rule == "round_robin":
        return ref_round_robin(rows, budget, seed)
    if rule == "round_robin_task":
        return ref_round_robin(rows, budget, seed, groups)
    if rule == "mean_top_k":
        return ref_mean_top_k(rows, budget)
    return ref_less(rows, budget, groups)


# ---- helpers --------------------------------------------------------------------------------------------


def stream(scores, size):
    return ((start, scores[start : start + size]) for start in range(0, len(scores), size))


def random_case(seed, ties):
    """A small random problem: float64 scores [n, m] (integer-valued when ties), budget, task labels."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 13, (1,), generator=gen))
    m = int(torch.randint(1, 6, (1,), generator=gen))
    budget = int(torch.randint(1, n + 1, (1,), generator=gen))
    if ties:
        scores = torch.randint(0, 3, (n, m), generator=gen).double()
    else:
        scores = torch.randn(n, m, generator=gen, dtype=torch.float64)
    groups = [LABELS[i] for i in torch.randint(0, 3, (m,), generator=gen).tolist()]
    return scores, budget, groups


def groups_for(rule, groups):
    return groups if rule in ("round_robin_task", "less") else None


def check_selection(result, budget, n):
    assert result.dtype == torch.long and result.shape == (budget,)
    assert len(set(result.tolist())) == budget
    assert all(0 <= row < n for row in result.tolist())


# ---- rules against the references -----------------------------------------------------------------------


# (rule, whether it gets task labels): "less" runs both with tasks and with every column its own task.
REFERENCE_CASES = [
    ("round_robin", False),
    ("round_robin_task", True),
    ("mean_top_k", False),
    ("less", True),
    ("less", False),
]


@pytest.mark.parametrize(("rule", "with_groups"), REFERENCE_CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["float", "ties"])
def test_rules_match_brute_force_reference(rule, with_groups, ties):
    for seed in range(40):
        scores, budget, groups = random_case(seed, ties)
        groups = groups if with_groups else None
        expected = reference(rule, scores, budget, seed, groups)
        for size in (1, 3, len(scores)):
            result = select_indices(stream(scores, size), budget, rule, seed=seed, target_groups=groups)
            check_selection(result, budget, len(scores))
            assert result.tolist() == expected, (seed, size)
        assert select_indices(scores, budget, rule, seed=seed, target_groups=groups).tolist() == expected


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_streaming_equals_in_memory(rule, dtype):
    gen = torch.Generator().manual_seed(0)
    scores = (torch.randn(37, 7, generator=gen) * 4).to(dtype)
    groups = groups_for(rule, ["x", "y", "x", "z", "y", "x", "z"])
    whole = select_indices(scores, 11, rule, seed=5, target_groups=groups)
    for size in (1, 3, 10, 37, 100):
        streamed = select_indices(stream(scores, size), 11, rule, seed=5, target_groups=groups, num_rows=37)
        assert torch.equal(streamed, whole), size


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("keep", [9, 25, 40, 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replaced_candidates_select_as_the_replaced_matrix(rule, keep, dtype, monkeypatch):
    """One pass, then some rows' scores made exact (an exact re-rank): every budget the candidates still vouch for
    selects what select_indices selects from the whole matrix with those rows replaced, ties included."""
    monkeypatch.setattr(selection, "_PRUNE_ELEMENTS", 50)  # the merge runs in slices of columns
    gen = torch.Generator().manual_seed(keep)
    scores = torch.randint(0, 6, (40, 5), generator=gen).to(dtype) / 3  # many ties; 1/3 rounds in float16
    rows = torch.tensor([33, 2, 17, 8, 39])
    new = torch.randint(0, 9, (len(rows), 5), generator=gen).float() / 3
    groups = groups_for(rule, ["x", "y", "x", "z", "y"])
    replaced = scores.clone()
    replaced[rows] = new.to(dtype)
    candidates = top_candidates(stream(scores, 7), keep, rule, groups).replaced(rows, new)
    assert candidates.valid == (40 if keep >= 40 else keep - len(rows))
    for budget in range(1, candidates.valid + 1):
        for seed in (0, 1):
            assert torch.equal(candidates.select(budget, seed),
                               select_indices(replaced, budget, rule, seed=seed, target_groups=groups)), (budget, seed)
    assert candidates.serves(candidates.valid, rule, groups) and not candidates.serves(1, "other", groups)
    if candidates.valid < 40:
        assert not candidates.serves(candidates.valid + 1, rule, groups)
        with pytest.raises(SelectionError, match="another pass"):
            candidates.select(candidates.valid + 1)


@pytest.mark.parametrize("rule", RULES)
def test_tensor_input_cut_into_chunks_internally(rule, monkeypatch):
    scores, budget, groups = random_case(11, ties=True)
    groups = groups_for(rule, groups)
    whole = select_indices(scores, budget, rule, seed=2, target_groups=groups)
    monkeypatch.setattr(selection, "_CHUNK_ELEMENTS", 7)  # a few rows per internal chunk
    assert torch.equal(select_indices(scores, budget, rule, seed=2, target_groups=groups), whole)


@pytest.mark.parametrize("rule", RULES)
def test_budget_equals_pool_and_budget_one(rule):
    scores = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    groups = groups_for(rule, ["a", "b", "a", "b"])
    everything = select_indices(scores, 9, rule, target_groups=groups)
    assert sorted(everything.tolist()) == list(range(9))
    first = select_indices(scores, 1, rule, target_groups=groups)
    assert first.tolist() == everything[:1].tolist()


def test_budget_one_takes_the_best_row_of_some_target():
    scores = torch.randn(20, 5, generator=torch.Generator().manual_seed(2))
    winners = set(scores.argmax(dim=0).tolist())
    for seed in range(10):
        assert select_indices(scores, 1, seed=seed).item() in winners


def test_single_target_all_rules_sort_the_column():
    scores = torch.tensor([[0.5], [2.0], [-1.0], [2.0], [0.0]])
    expected = [1, 3, 0, 4, 2]  # the tie between rows 1 and 3 goes to the lower row
    for rule in RULES:
        groups = ["t"] if rule == "round_robin_task" else None
        assert select_indices(scores, 5, rule, target_groups=groups).tolist() == expected
        assert select_indices(stream(scores, 2), 3, rule, target_groups=groups).tolist() == expected[:3]


@pytest.mark.parametrize("budget", [1, 4, 5, 7, 11, 12])
def test_round_robin_gives_each_target_its_share(budget):
    # Target j prefers its own block of 3 rows (rows 3j..3j+2) over every other row, so the row tells who
    # picked it. budget is often not a multiple of m = 4: every target gets floor or ceil(budget / m).
    m, block = 4, 3
    scores = torch.full((m * block, m), -1.0)
    for j in range(m):
        scores[j * block : (j + 1) * block, j] = torch.tensor([3.0, 2.0, 1.0])
    for seed in range(5):
        picked = select_indices(stream(scores, 5), budget, seed=seed)
        owners = [row // block for row in picked.tolist()]
        counts = sorted(owners.count(j) for j in range(m))
        assert counts == sorted([budget // m + (j < budget % m) for j in range(m)])
        for start in range(0, budget - budget % m, m):  # each full round visits every target once
            assert sorted(owners[start : start + m]) == list(range(m))


@pytest.mark.parametrize("rule", RULES)
def test_identical_rows_are_never_selected_twice(rule):
    row = torch.tensor([1.0, 5.0, 2.0])
    groups = groups_for(rule, ["a", "a", "b"])
    scores = torch.cat([row.expand(6, 3), torch.zeros(2, 3)])
    picked = select_indices(stream(scores, 3), 7, rule, target_groups=groups)
    assert picked.tolist() == [0, 1, 2, 3, 4, 5, 6]  # all tied: lowest rows first, then a zero row


def test_round_robin_is_deterministic_and_seeded():
    scores = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    runs = {tuple(select_indices(scores, 20, seed=seed).tolist()) for seed in range(10)}
    assert len(runs) > 1
    assert torch.equal(select_indices(scores, 20, seed=4), select_indices(stream(scores, 7), 20, seed=4))
    assert torch.equal(select_indices(scores, 20, seed=4), select_indices(scores, 20, seed=4))


def test_task_order_does_not_depend_on_label_order():
    scores = torch.randn(30, 6, generator=torch.Generator().manual_seed(4))
    groups = ["q", "p", "q", "r", "p", "r"]
    perm = [3, 0, 5, 1, 2, 4]  # the same tasks with the columns shuffled: task means are unchanged
    for seed in range(5):
        a = select_indices(scores, 12, "round_robin_task", seed=seed, target_groups=groups)
        b = select_indices(scores[:, perm], 12, "round_robin_task", seed=seed, target_groups=[groups[i] for i in perm])
        assert a.tolist() == b.tolist()


def test_less_hand_computed_example():
    scores = torch.tensor(
        [
            [1.0, 3.0, 0.0, 0.0],  # task a mean 2, task b mean 0 -> LESS key 2, overall mean 1
            [0.0, 0.0, 5.0, -1.0],  # a 0, b 2 -> 2, mean 1
            [2.0, 2.0, 2.0, 2.0],  # a 2, b 2 -> 2, mean 2
            [4.0, -2.0, 1.0, 1.0],  # a 1, b 1 -> 1, mean 1
            [3.0, 3.0, -6.0, 0.0],  # a 3, b -3 -> 3, mean 0
        ]
    )
    assert select_indices(scores, 5, "less", target_groups=["a", "a", "b", "b"]).tolist() == [4, 0, 1, 2, 3]
    assert select_indices(scores, 3, "less", target_groups=["a", "a", "b", "b"]).tolist() == [4, 0, 1]
    assert select_indices(scores, 5, "less").tolist() == [1, 3, 0, 4, 2]  # per-column tasks: max over columns
    assert select_indices(scores, 5, "mean_top_k").tolist() == [2, 0, 1, 3, 4]


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["tensor", "stream"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_name_row_and_column(where, bad):
    scores = torch.randn(10, 4)
    scores[5, 2] = bad
    scores[7, 0] = math.nan  # later row: the first offending one is reported
    source = scores if where == "tensor" else stream(scores, 3)
    with pytest.raises(SelectionError, match=r"pool row 5, target column 2"):
        select_indices(source, 2)


def test_shorter_stream_than_budget():
    scores = torch.randn(4, 2)
    with pytest.raises(SelectionError, match=r"budget 6 is larger than the pool \(4 rows\)"):
        select_indices(stream(scores, 3), 6)
    with pytest.raises(SelectionError, match=r"budget 6 is larger than the pool \(4 rows\)"):
        select_indices(scores, 6)
    with pytest.raises(SelectionError, match="budget 6 is larger than the pool"):
        select_indices(iter(()), 6, num_rows=4)  # checked before reading the stream


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": torch.zeros(0, 3)}, "empty pool"),
        ({"scores": iter(())}, "empty pool"),
        ({"scores": torch.zeros(5, 0)}, "no target columns"),
        ({"scores": torch.zeros(5)}, "2-D"),
        ({"rule": "top_k"}, "rule must be one of"),
        ({"budget": 2.0}, "budget must be an int"),
        ({"budget": True}, "budget must be an int"),
        ({"budget": 0}, "budget must be at least 1"),
        ({"seed": "0"}, "seed must be an int"),
        ({"rule": "round_robin_task"}, "needs target_groups"),
        ({"rule": "round_robin", "target_groups": ["a"] * 3}, "does not use target_groups"),
        ({"rule": "less", "target_groups": ["a", "b"]}, "target_groups has 2 labels but scores has 3"),
        ({"rule": "less", "target_groups": ["a", 1, "b"]}, "sortable"),
        ({"num_rows": 5}, "num_rows is 5 but scores has 6 rows"),
        ({"scores": stream(torch.zeros(6, 3), 4), "num_rows": 7}, "num_rows is 7 but the scores stream had 6"),
        ({"scores": iter([(0, torch.zeros(2, 3)), (3, torch.zeros(2, 3))])}, "starts at row 3, expected 2"),
        ({"scores": iter([(0, torch.zeros(2, 3)), (2, torch.zeros(2, 4))])}, "row 2 has 4 target columns"),
        ({"scores": iter([(0, torch.zeros(3))])}, "row 0 must be 2-D"),
        ({"scores": iter([torch.zeros(2, 3)])}, r"\(start, chunk\) pairs"),
    ],
)
def test_select_errors(kwargs, match):
    args = {"scores": torch.zeros(6, 3), "budget": 2} | kwargs
    with pytest.raises(SelectionError, match=match):
        select_indices(**args)


@pytest.mark.parametrize(
    ("budget", "pool", "expected"),
    [
        (10, 40, 10),
        (40, 40, 40),
        (1, 1, 1),
        (np.int64(3), 40, 3),
        (0.5, 40, 20),
        (1.0, 40, 40),
        (0.001, 40, 1),
        (0.3, 5, 2),
        (0.7, 5, 4),
        (np.float32(0.25), 40, 10),
        (20.0, 40, 20),
    ],
)
def test_resolve_budget(budget, pool, expected):
    """(an integral float above 1 counts rows: 20.0 -> 20, as parse_budget reads it)"""
    result = resolve_budget(budget, pool)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    ("budget", "pool", "match"),
    [
        (50, 40, r"^budget 50 is larger than the pool \(40 rows\)$"),
        (0, 40, r"budget must be at least 1, got 0 \(pool of 40 rows\)"),
        (-3, 40, "budget must be at least 1, got -3"),
        (True, 40, r"budget must be an int count or a float fraction, got True \(pool of 40 rows\)"),
        ("10", 40, "budget must be an int count or a float fraction"),
        (0.0, 40, r"budget fraction must be in \(0, 1\], got 0.0 \(pool of 40 rows\)"),
        (-0.5, 40, "budget fraction must be in"),
        (1.5, 40, r"budget fraction must be in \(0, 1\], got 1.5"),
        (math.nan, 40, "budget fraction must be in .*nan"),
        (math.inf, 40, "budget fraction must be in .*inf"),
        (5, 0, r"budget 5: cannot select from an empty pool \(0 rows\)"),
        (0.5, 0, "empty pool"),
        (5, -1, "pool_size must be a non-negative int"),
    ],
)
def test_resolve_budget_errors(budget, pool, match):
    with pytest.raises(SelectionError, match=match):
        resolve_budget(budget, pool)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("100", 100), (" 7 ", 7), ("0.05", 0.05), ("100.0", 100), (100.0, 100), (np.int64(3), 3), (0.25, 0.25),
     (1.0, 1.0), ("1", 1)],
)
def test_parse_budget_is_the_one_reading_of_a_budget(value, expected):
    result = parse_budget(value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "match"),
    [("lots", r"influence_budget must be an integer \(rows\) or a float"), (0, "influence_budget must be at least 1"),
     ("-2", "at least 1"), (1.5, r"pool share must be in \(0, 1\], got 1.5"),
     (True, "int count or a float fraction, got True"), (None, "got None"), (math.nan, "must be in")],
)
def test_parse_budget_errors_name_the_argument(value, match):
    with pytest.raises(SelectionError, match=match):
        parse_budget(value, "influence_budget" if isinstance(value, str) or value in (0, 1.5) else "budget")


# ---- weighted and random baselines ----------------------------------------------------------------------


def test_weighted_sample_skips_zero_weights_and_is_seeded():
    weights = torch.tensor([0.0, 1.0, 0.0, 5.0, 2.0, 0.0, 1.0])
    for seed in range(200):
        picked = weighted_sample(weights, 3, seed=seed)
        check_selection(picked, 3, 7)
        assert all(weights[row] > 0 for row in picked.tolist())
    assert sorted(weighted_sample(weights, 4).tolist()) == [1, 3, 4, 6]
    assert torch.equal(weighted_sample(weights, 3, seed=9), weighted_sample(weights, 3, seed=9))
    assert len({tuple(weighted_sample(weights, 3, seed=seed).tolist()) for seed in range(20)}) > 1


def test_weighted_sample_frequencies_follow_weights():
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    first = torch.tensor([weighted_sample(weights, 1, seed=seed).item() for seed in range(4000)])
    freq = torch.bincount(first, minlength=5).double() / len(first)
    assert torch.allclose(freq, weights.double() / weights.sum(), atol=0.03)
    # Without replacement: the heaviest row is in a 2-draw sample with probability 0.4 + sum_i w_i/10 * 4/(10-w_i).
    both = [3 in weighted_sample(weights, 2, seed=seed).tolist() for seed in range(2000)]
    expected = 0.4 + sum(w / 10 * 4 / (10 - w) for w in (1, 2, 3))
    assert abs(sum(both) / len(both) - expected) < 0.04


@pytest.mark.parametrize(
    ("weights", "budget", "match"),
    [
        ([1.0, -1.0, 2.0], 1, "row 1 has -1.0"),
        ([1.0, 2.0, math.nan], 1, "row 2 has nan"),
        ([math.inf, 2.0], 1, "row 0 has inf"),
        ([0.0, 1.0, 2.0, 0.0, 3.0, 0.0], 5, "^only 3 rows have a positive weight, budget is 5$"),
        ([], 1, "empty pool"),
        ([[1.0, 2.0]], 1, "1-D"),
        ([1.0, 2.0], 3, r"budget 3 is larger than the pool \(2 rows\)"),
        ([1.0, 2.0], 0.5, "budget must be an int"),
    ],
)
def test_weighted_sample_errors(weights, budget, match):
    with pytest.raises(SelectionError, match=match):
        weighted_sample(torch.tensor(weights), budget)


def _greedy_facility_location(scores, budget):
    values = scores.double() - scores.double().min()
    covered, chosen = torch.zeros(values.shape[1], dtype=torch.float64), []
    for _ in range(budget):
        gains = (values - covered).clamp_min(0).sum(1)
        gains[chosen] = -1.0
        best = int(torch.argmax(gains))  # first maximum: the lowest row among ties
        chosen.append(best)
        covered = torch.maximum(covered, values[best])
    return chosen


@pytest.mark.parametrize("seed", range(10))
def test_facility_location_lazy_greedy_equals_plain_greedy(seed):
    from hf_influence.selection.rules import facility_location

    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(40, 6, generator=generator)
    chosen = facility_location(scores, 12)
    assert chosen.tolist() == _greedy_facility_location(scores, 12)
    assert select_indices(scores, 12, rule="facility_location").tolist() == chosen.tolist()
    assert select_indices(((s, scores[s:s + 7]) for s in range(0, 40, 7)), 12, rule="facility_location",
                          num_rows=40).tolist() == chosen.tolist()


def test_facility_location_covers_every_target_first():
    # Row i is the only good row for target i: greedy coverage takes one per target before any second pick.
    scores = torch.eye(4) * 10 + torch.arange(4.0).unsqueeze(0) * 0.01
    scores = torch.cat([scores, scores[:1] * 0.9])
    assert sorted(select_indices(scores, 4, rule="facility_location").tolist()) == [0, 1, 2, 3]


def test_chunks_of_any_length_select_as_the_whole_matrix():
    """One candidate keeper serves every input: chunks longer than the first are offered in pieces."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 6, generator=generator)
    scores[100:140] = scores[0]  # ties, broken by the lower row
    sizes = [3, 200, 1, 296]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for rule in ("round_robin", "mean_top_k", "less"):
        whole = select_indices(scores, 40, rule=rule, seed=2)
        chunked = select_indices(((s, scores[s : s + n]) for s, n in zip(starts, sizes)), 40, rule=rule, seed=2)
        assert torch.equal(whole, chunked), rule


# ---- choose_rows: the one scores -> rows step -------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULE_TABLE))
def test_choose_rows_is_each_rule_on_what_it_reads(rule):
    """Every rule of the table through the one step: the rule's own function on the input it reads; the other
    input is never computed (a lazy score matrix is not built for weights, nor weights for scores)."""
    gen = torch.Generator().manual_seed(3)
    scores, weights = torch.randn(30, 4, generator=gen), torch.rand(30, generator=gen)
    groups = ["a", "b", "a", "b"]

    def never():
        raise AssertionError("computed an input the rule does not read")

    if RULE_TABLE[rule].weights:
        expected = weighted_sample(weights, 6, seed=2)
        chosen = choose_rows(6, rule, 2, scores=never, weights=lambda: weights, target_groups=groups)
    else:
        expected = select_indices(scores, 6, rule, seed=2, target_groups=groups if rule in GROUPED_RULES else None)
        chosen = choose_rows(6, rule, 2, scores=lambda: scores, weights=never, target_groups=groups)
    assert torch.equal(chosen, expected)


def test_choose_rows_streams_the_streaming_rules_and_maps_selectable_rows():
    scores = torch.randn(30, 4, generator=torch.Generator().manual_seed(4))

    class Stream:  # what a ScoreStream offers: select(budget, rule, seed, groups)
        def select(self, budget, rule, seed, groups):
            return select_indices(scores, budget, rule, seed=seed, target_groups=groups)

    def never():
        raise AssertionError("built the score matrix for a streaming rule")

    for rule in RULES:
        groups = ["a", "b", "a", "b"] if rule in GROUPED_RULES else None
        assert torch.equal(choose_rows(5, rule, 1, scores=never, stream=Stream(), target_groups=["a", "b", "a", "b"]),
                           select_indices(scores, 5, rule, seed=1, target_groups=groups))
    # facility location reads the whole matrix even with a stream at hand
    assert torch.equal(choose_rows(5, "facility_location", 0, scores=lambda: scores, stream=Stream()),
                       select_indices(scores, 5, "facility_location"))
    selectable = torch.zeros(30, dtype=torch.bool)
    selectable[10:20] = True
    chosen = choose_rows(4, "mean_top_k", 0, scores=scores, selectable=selectable)
    assert torch.equal(chosen, 10 + select_indices(scores[10:20], 4, "mean_top_k"))
    with pytest.raises(SelectionError, match="budget 11 is larger than the 10 selectable pool rows"):
        choose_rows(11, "mean_top_k", 0, scores=scores, selectable=selectable)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rule": "top_k", "scores": torch.zeros(3, 2)}, "rule must be one of"),
    ({"rule": "weighted", "scores": torch.zeros(3, 2)}, "needs per-row weights"),
    ({"rule": "round_robin", "weights": torch.ones(3)}, "needs the score matrix"),
])
def test_choose_rows_errors(kwargs, match):
    with pytest.raises(SelectionError, match=match):
        choose_rows(2, seed=0, **kwargs)


def test_rule_table_is_the_one_list_of_rules():
    from hf_influence.options import SelectionConfig

    assert set(RULES) == {"round_robin", "round_robin_task", "mean_top_k", "less"}
    assert set(GROUPED_RULES) == {"round_robin_task", "less"}
    help_text = SelectionConfig.__dataclass_fields__["selection"].metadata["help"]
    for rule in RULE_TABLE:  # every rule is documented where users choose it
        assert f'"{rule}"' in help_text, rule
