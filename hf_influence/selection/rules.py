"""Selection rules: turn an influence score matrix into the pool rows to train on (docs/algorithms.md §1.6).

`scores` is a float matrix [n, m]: row i is pool sample i, column j is target sample j, higher means
pool sample i helps target j more. Rules:

- round_robin:      in each round visit the targets in a seeded random order; each takes its best pool
                    row not selected yet; stop exactly at the budget (the RDS+ "max" rule).
- round_robin_task: the same over target tasks, after averaging the columns within each task.
- mean_top_k:       mean over targets, then the top-budget rows.
- less:             LESS's rule: mean within each task, max over tasks, then the top-budget rows.
- facility_location: lazy greedy coverage of the targets (DELIFT's), on the whole matrix.
- weighted:         rows drawn without replacement in proportion to per-row weights (robust weighting).

choose_rows is the one step from a run's scores (a matrix, a stream or weights) to rows, for every rule.

Pool scores may have millions of rows, so every rule streams: `scores` is a Tensor [n, m] or an
iterable of (start, chunk) pairs, chunk [rows, m] holding rows start..start+rows-1, consecutive from 0.
A Tensor is cut into chunks internally, so both inputs run the same code and give identical results.
Memory stays O(chunk * m + m * budget): a target skips only rows somebody else already took and at
most budget rows are ever taken, so its pick always lies among its best `budget` rows; each target
(or task) keeps just those candidates while streaming, and the top-k rules keep the best `budget` keys.

Ties always go to the lower row index (stable sorts; torch.topk is not stable on ties), and every
random choice comes from a CPU torch.Generator seeded with `seed`, so results are reproducible.
"""

import heapq
import math
import numbers
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import HFInfluenceError


@dataclass(frozen=True)
class Rule:
    """What a selection rule reads and how it runs (RULE_TABLE; choose_rows dispatches on it)."""

    grouped: bool = False  # reads each target column's task label
    streams: bool = False  # runs on a stream of score chunks, memory independent of the pool size
    weights: bool = False  # reads per-row weights instead of scores


# The one table of selection rules (the module docstring says what each does).
RULE_TABLE = {
    "round_robin": Rule(streams=True),
    "round_robin_task": Rule(grouped=True, streams=True),
    "mean_top_k": Rule(streams=True),
    "less": Rule(grouped=True, streams=True),
    "facility_location": Rule(),  # a lazy greedy over the whole [n, m] matrix
    "weighted": Rule(weights=True),
}
# The rules select_indices streams, and those that group the target columns by task.
RULES = tuple(name for name, rule in RULE_TABLE.items() if rule.streams)
GROUPED_RULES = tuple(name for name, rule in RULE_TABLE.items() if rule.grouped)

# A Tensor input is read in chunks of about this many scores, so that the candidate merge (a sort of
# budget + chunk rows per column) never needs more than one chunk of temporaries.
_CHUNK_ELEMENTS = 2**22
# Elements sorted at once when the candidate buffer is pruned (bounds its temporary memory).
_PRUNE_ELEMENTS = 2**24

ScoreInput = Tensor | Iterable[tuple[int, Tensor]]


class SelectionError(HFInfluenceError, ValueError):
    """Bad input to a selection rule; the message names the argument, pool row or target column."""


def parse_budget(budget: Any, name: str = "budget") -> int | float:
    """The one reading of a budget, for the API, the trainer's config and the command line: an int row count,
    or a float pool share in (0, 1]. A string is read as a number; an integral float above 1 ("100", 100.0, as
    a command line or a YAML file gives it) counts rows.

    Raises:
        SelectionError: not a number, fewer than 1 row, or a share outside (0, 1]; the message names `name`.
    """
    if isinstance(budget, str):
        try:
            budget = int(budget.strip())
        except ValueError:
            try:
                budget = float(budget.strip())
            except ValueError:
                raise SelectionError(f"{name} must be an integer (rows) or a float in (0, 1] (pool share), got "
                                     f"{budget!r}") from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise SelectionError(f"{name} must be an int count or a float fraction, got {budget!r}")
    if not isinstance(budget, numbers.Integral) and budget > 1 and float(budget).is_integer():
        budget = int(budget)
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise SelectionError(f"{name} must be at least 1, got {budget}")
        return int(budget)
    if not 0 < budget <= 1:  # also false for NaN
        raise SelectionError(f"{name} as a pool share must be in (0, 1], got {budget}")
    return float(budget)


def resolve_budget(budget: float, pool_size: int) -> int:
    """
    Turn a budget into a row count.

    budget: an int count, 1 <= budget <= pool_size, or a float fraction of the pool in (0, 1]; an integral
        float above 1 counts rows (as in parse_budget).
    pool_size: number of pool rows n (>= 1).
    Returns: the count; a fraction f gives max(1, round(f * pool_size)).
    """
    if isinstance(pool_size, bool) or not isinstance(pool_size, numbers.Integral) or pool_size < 0:
        raise SelectionError(f"pool_size must be a non-negative int, got {pool_size!r}")
    if pool_size == 0:
        raise SelectionError(f"budget {budget!r}: cannot select from an empty pool (0 rows)")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise SelectionError(
            f"budget must be an int count or a float fraction, got {budget!r} (pool of {pool_size} rows)"
        )
    if not isinstance(budget, numbers.Integral) and budget > 1 and float(budget).is_integer():
        budget = int(budget)  # 100.0 is 100 rows, as parse_budget reads it
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise SelectionError(f"budget must be at least 1, got {budget} (pool of {pool_size} rows)")
        if budget > pool_size:
            raise SelectionError(f"budget {budget} is larger than the pool ({pool_size} rows)")
        return int(budget)
    if not 0 < budget <= 1:  # also false for NaN
        raise SelectionError(f"budget fraction must be in (0, 1], got {budget} (pool of {pool_size} rows)")
    return max(1, round(float(budget) * int(pool_size)))


def _count(budget: int, pool_size: int | None) -> int:
    """Check an int budget against the pool size, or only its type and sign while the size is unknown."""
    # The rules take row counts only: a streamed pool has no size to resolve a fraction against.
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise SelectionError(f"budget must be an int row count (see resolve_budget for fractions), got {budget!r}")
    if pool_size is None:
        if budget < 1:
            raise SelectionError(f"budget must be at least 1, got {budget}")
        return int(budget)
    return resolve_budget(budget, pool_size)


def _generator(seed: int) -> torch.Generator:
    # CPU generator: CUDA streams differ, and selections must not depend on where the scores live.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise SelectionError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _chunks(scores: ScoreInput, num_rows: int | None) -> Iterator[tuple[int, Tensor]]:
    """Validate the input and yield (start, chunk [rows, m]) in order, in their own dtype."""
    pairs = scores
    if isinstance(scores, Tensor):
        if scores.dim() != 2:
            raise SelectionError(f"scores must be a 2-D [pool, targets] tensor, got shape {tuple(scores.shape)}")
        if num_rows is not None and num_rows != len(scores):
            raise SelectionError(f"num_rows is {num_rows} but scores has {len(scores)} rows")
        step = max(1, _CHUNK_ELEMENTS // max(1, scores.shape[1]))
        pairs = ((start, scores[start : start + step]) for start in range(0, len(scores), step))
    expected, width = 0, None
    for item in pairs:
        if not isinstance(item, tuple) or len(item) != 2:
            raise SelectionError(f"streamed scores must be (start, chunk) pairs, got {type(item).__name__}")
        start, chunk = item
        chunk = torch.as_tensor(chunk)
        if start != expected:
            raise SelectionError(
                f"scores chunk starts at row {start}, expected {expected} (chunks must be consecutive)"
            )
        if chunk.dim() != 2:
            raise SelectionError(f"scores chunk at row {start} must be 2-D [rows, targets], got {tuple(chunk.shape)}")
        if width is None:
            width = chunk.shape[1]
            if width == 0:
                raise SelectionError("scores has no target columns")
        elif chunk.shape[1] != width:
            raise SelectionError(f"scores chunk at row {start} has {chunk.shape[1]} target columns, expected {width}")
        bad = ~torch.isfinite(chunk)
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise SelectionError(
                f"scores has a non-finite value ({chunk[row, col].item()}) at pool row {start + row}, target column {col}"
            )
        yield start, chunk
        expected += len(chunk)


def _promoted(chunk: Tensor) -> Tensor:
    """Scores are ranked in at least float32 (a half-precision sum over targets would round)."""
    return chunk.to(torch.promote_types(chunk.dtype, torch.float32))


def _task_plan(target_groups: Sequence[Hashable], width: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """
    Plan the per-task column means: tasks are the sorted distinct labels.

    Returns: steps, a list of (tasks, columns) LongTensor pairs, step k adding each listed task's k-th
    column (in column order); and counts [tasks], float, the number of columns per task.
    """
    if len(target_groups) != width:
        raise SelectionError(f"target_groups has {len(target_groups)} labels but scores has {width} target columns")
    try:
        labels = sorted(set(target_groups))
    except TypeError as error:
        raise SelectionError(f"target_groups labels must be sortable against each other: {error}") from None
    position = {label: task for task, label in enumerate(labels)}
    members = [[] for _ in labels]
    for column, label in enumerate(target_groups):
        members[position[label]].append(column)
    steps = []
    for k in range(max(len(columns) for columns in members)):
        tasks = [task for task, columns in enumerate(members) if len(columns) > k]
        steps.append((torch.tensor(tasks), torch.tensor([members[task][k] for task in tasks])))
    return steps, torch.tensor([float(len(columns)) for columns in members])


def _task_means(by_target: Tensor, steps: list[tuple[Tensor, Tensor]], counts: Tensor) -> Tensor:
    """Mean of by_target [m, rows] (a transposed chunk) over each task's targets -> [tasks, rows]."""
    # Targets are added one at a time in a fixed order, so a row's mean is bit-identical whatever the
    # chunk size; a sum() or matmul over the targets may reduce in a different order for 1 row than for many.
    device = by_target.device
    sums = by_target[steps[0][1].to(device)]  # every task has a first target; indexing copies
    for tasks, columns in steps[1:]:
        sums[tasks.to(device)] += by_target[columns.to(device)]
    return sums / counts.to(by_target).unsqueeze(1)


class TopRows:
    """
    The one keeper of top candidates (select_indices, stream_select, InfluenceNetwork.top_candidates): for each
    of c columns, the best k (key, row) pairs of the stream so far by key descending, then row ascending
    (select_indices' order), kept lazily in a [c, k + slack] buffer; `add` takes at most `slack` rows at once.

    A row enters a column only when its key beats the column's threshold, the k-th best key at the last prune
    (an equal key comes from a later row, so it ranks below); when a column would overflow, every column is
    pruned back to its best k. Inside the buffer, entries with equal keys always lie in increasing row order
    (appended in stream order after the kept ones), so a stable sort by key restores the full order.
    With random arrival about k (1 + ln(n / k)) rows ever enter a column, so a prune is rare.
    """

    def __init__(self, columns: int, k: int, slack: int, key_dtype: torch.dtype, device: torch.device, n: int):
        self.k, self.capacity = k, k + slack
        self.keys = torch.full((columns, self.capacity), -math.inf, dtype=key_dtype, device=device)
        row_dtype = torch.int32 if n < 2**31 else torch.int64
        self.rows = torch.full((columns, self.capacity), -1, dtype=row_dtype, device=device)
        self.fill = torch.zeros(columns, dtype=torch.long, device=device)
        self.threshold = torch.full((columns, 1), -math.inf, dtype=key_dtype, device=device)

    def add(self, keys: Tensor, start: int) -> None:
        """Offer keys [c, rows] of pool rows start..start+rows-1 (rows <= slack)."""
        entering = keys > self.threshold
        counts = entering.sum(1)
        if int((self.fill + counts).max()) > self.capacity:
            self.prune()
            entering = keys > self.threshold
            counts = entering.sum(1)
        columns, positions = entering.nonzero(as_tuple=True)  # ordered by column, then position
        if not len(columns):
            return
        first_of_column = counts.cumsum(0) - counts
        slots = self.fill[columns] + torch.arange(len(columns), device=keys.device) - first_of_column[columns]
        self.keys[columns, slots] = keys[columns, positions]
        self.rows[columns, slots] = (positions + start).to(self.rows.dtype)
        self.fill += counts

    def prune(self) -> None:
        """Sort every column's entries and keep its best k."""
        width = int(self.fill.max())
        step = max(1, _PRUNE_ELEMENTS // max(1, width))
        for lo in range(0, self.keys.shape[0], step):
            keys, order = self.keys[lo : lo + step, :width].sort(dim=1, descending=True, stable=True)
            self.rows[lo : lo + step, :width] = self.rows[lo : lo + step, :width].gather(1, order)
            self.keys[lo : lo + step, :width] = keys
        self.keys[:, self.k :] = -math.inf
        self.rows[:, self.k :] = -1
        self.fill.clamp_(max=self.k)
        self.threshold = self.keys[:, self.k - 1 : self.k].clone()

    def top(self, seen: int) -> tuple[Tensor, Tensor]:
        """Keys and pool rows [c, min(k, seen)] (rows int64), best first, after the whole stream of `seen` rows."""
        self.prune()
        width = min(self.k, seen)
        return self.keys[:, :width], self.rows[:, :width].long()

    def best(self, seen: int) -> Tensor:
        """Pool rows [c, min(k, seen)] (int64, best first) after the whole stream."""
        return self.top(seen)[1]


def _round_robin(candidates: Tensor, budget: int, generator: torch.Generator) -> Tensor:
    """
    Run the round-robin on each column's candidate rows [c, K], best first, K >= budget or K = n.

    Returns: LongTensor [budget] of pool rows in picking order.
    """
    candidates = candidates.cpu().numpy()
    pointer = [0] * len(candidates)
    taken, picked = set(), []
    while len(picked) < budget:
        for column in torch.randperm(len(candidates), generator=generator).tolist():
            # Everything a column skips was taken, so it never runs past its K candidates.
            row = int(candidates[column, pointer[column]])
            while row in taken:
                pointer[column] += 1
                row = int(candidates[column, pointer[column]])
            taken.add(row)
            picked.append(row)
            if len(picked) == budget:
                break
    return torch.tensor(picked, dtype=torch.long)


def _check_rule(rule: str, target_groups) -> None:
    if rule not in RULES:
        raise SelectionError(f"rule must be one of {(*RULES, 'facility_location')}, got {rule!r}")
    if rule == "round_robin_task" and target_groups is None:
        raise SelectionError("rule 'round_robin_task' needs target_groups (one task label per target column)")
    if rule in ("round_robin", "mean_top_k") and target_groups is not None:
        raise SelectionError(f"rule {rule!r} does not use target_groups; use 'round_robin_task' or 'less'")


def _rule_keys(chunk: Tensor, rule: str, plan) -> Tensor:
    """The rule's ranking keys [c, rows] of a score chunk [rows, m]: the targets (round_robin), the task means
    (round_robin_task), their mean (mean_top_k) or their max (less). Per row and element-wise, so a row's keys
    are bit-identical whatever chunk it comes in."""
    keys = chunk.T.contiguous()  # [targets, rows]
    if rule != "round_robin":
        keys = _task_means(keys, *plan)
    if rule == "less":
        keys = keys.amax(dim=0, keepdim=True)
    return keys


class Candidates:
    """
    What a selection keeps of a whole score stream: each key column's best rows (keys and rows [c, K], best
    first: key descending, then row ascending), enough to run the rule for any budget <= `valid` without
    another pass. `replaced` updates it when some rows' scores change (an exact re-rank), so one pass over a
    pool serves both a shortlist and the final selection.
    """

    def __init__(self, keys: Tensor, rows: Tensor, *, rule: str, target_groups, plan, width: int, seen: int,
                 score_dtype: torch.dtype, valid: int):
        self.keys, self.rows, self.rule, self.plan = keys, rows, rule, plan
        self.target_groups = None if target_groups is None else tuple(target_groups)
        self.width, self.seen, self.score_dtype, self.valid = width, seen, score_dtype, valid

    def serves(self, budget: int, rule: str, target_groups) -> bool:
        """Whether select(budget) is the selection `rule` with these groups would make on the stream."""
        groups = None if target_groups is None else tuple(target_groups)
        return rule == self.rule and groups == self.target_groups and budget <= self.valid

    def select(self, budget: int, seed: int = 0) -> Tensor:
        """The rule's `budget` rows (LongTensor [budget], CPU, selection order), as select_indices gives them."""
        _count(budget, self.seen)
        if budget > self.valid:
            raise SelectionError(f"these candidates hold each column's best {self.valid} rows: a budget of {budget} "
                                 f"needs another pass over the scores")
        best = self.rows[:, :budget]
        if self.rule in ("mean_top_k", "less"):
            return best[0].long().cpu()
        return _round_robin(best, budget, _generator(seed))

    def replaced(self, rows: Tensor, scores: Tensor) -> "Candidates":
        """
        The candidates of the same stream with the scores of `rows` [r] (distinct pool rows) replaced by
        `scores` [r, m] (cast to the stream's dtype first, as selection/streaming.py's exact overrides are). Every other
        row keeps its keys, so the best K - r rows of each column are known exactly afterwards (all of them
        when the stream was kept whole): valid drops by r.
        """
        rows = torch.as_tensor(rows).reshape(-1).to(device=self.rows.device, dtype=self.rows.dtype)
        scores = _promoted(torch.as_tensor(scores).to(device=self.keys.device, dtype=self.score_dtype))
        if tuple(scores.shape) != (len(rows), self.width):
            raise SelectionError(f"replacement scores must be [{len(rows)}, {self.width}], got {list(scores.shape)}")
        new_keys = _rule_keys(scores, self.rule, self.plan)  # [c, r]
        keep = self.keys.shape[1]
        keys, kept_rows = torch.empty_like(self.keys), torch.empty_like(self.rows)
        step = max(1, _PRUNE_ELEMENTS // max(1, keep + len(rows)))
        for lo in range(0, len(keys), step):
            old_keys = self.keys[lo : lo + step].masked_fill(torch.isin(self.rows[lo : lo + step], rows), -math.inf)
            merged_keys = torch.cat([old_keys, new_keys[lo : lo + step]], dim=1)
            merged_rows = torch.cat([self.rows[lo : lo + step], rows.expand(len(old_keys), -1)], dim=1)
            # Row ascending, then (stable) key descending: select_indices' order; dropped entries sort last.
            order = merged_rows.sort(dim=1, stable=True).indices
            merged_keys, merged_rows = merged_keys.gather(1, order), merged_rows.gather(1, order)
            order = merged_keys.sort(dim=1, descending=True, stable=True).indices[:, :keep]
            keys[lo : lo + step], kept_rows[lo : lo + step] = merged_keys.gather(1, order), merged_rows.gather(1, order)
        valid = self.seen if keep == self.seen else max(0, self.valid - len(rows))
        return Candidates(keys, kept_rows, rule=self.rule, target_groups=self.target_groups, plan=self.plan,
                          width=self.width, seen=self.seen, score_dtype=self.score_dtype, valid=valid)


def key_columns(rule: str, width: int, target_groups=None) -> int:
    """How many key columns c a rule ranks `width` target columns by: each target (round_robin), each task
    (round_robin_task; less keeps one, the max over its tasks) or one (top-k rules)."""
    if rule == "round_robin":
        return width
    if rule == "round_robin_task":
        return len(set(target_groups))
    return 1


def top_candidates(scores: ScoreInput, keep: int, rule: str = "round_robin", target_groups=None,
                   num_rows: int | None = None) -> Candidates:
    """
    Stream the scores once and keep each key column's best `keep` rows (see Candidates): select_indices(scores,
    budget, ...) == top_candidates(scores, keep, ...).select(budget, seed) for every budget <= keep.

    scores, rule, target_groups, num_rows: as in select_indices. keep: rows kept per key column (>= 1).
    Memory: O(chunk x m + c x keep), c = m (round_robin), the number of tasks, or 1 (top-k rules).
    """
    _check_rule(rule, target_groups)
    keep = _count(keep, None)
    plan = candidates = None
    seen = 0
    for start, chunk in _chunks(scores, num_rows):
        if candidates is None:  # the targets and the dtype are known from the first chunk on
            width, score_dtype = chunk.shape[1], chunk.dtype
            if rule != "round_robin":
                groups = [0] * width if rule == "mean_top_k" else target_groups
                plan = _task_plan(list(range(width)) if groups is None else groups, width)
        keys = _rule_keys(_promoted(chunk), rule, plan)
        if candidates is None:  # one keeper of the best `keep` rows per column, whatever the pool size
            candidates = TopRows(len(keys), keep, max(len(chunk), keep // 4), keys.dtype, keys.device,
                                 2**31 if num_rows is None else num_rows)
        slack = candidates.capacity - candidates.k  # a chunk longer than the first is offered in pieces
        for offset in range(0, keys.shape[1], slack):
            candidates.add(keys[:, offset : offset + slack], start + offset)
        seen += len(chunk)
    if num_rows is not None and seen != num_rows:
        raise SelectionError(f"num_rows is {num_rows} but the scores stream had {seen} rows")
    if candidates is None:
        _count(keep, 0)  # raises: an empty pool
    candidates.prune()
    width_kept = min(keep, seen)  # views of the keeper's buffer: no copy of c x keep entries
    keys, rows = candidates.keys[:, :width_kept], candidates.rows[:, :width_kept]
    return Candidates(keys, rows, rule=rule, target_groups=target_groups, plan=plan, width=width, seen=seen,
                      score_dtype=score_dtype, valid=keys.shape[1])


def select_indices(
    scores: ScoreInput,
    budget: int,
    rule: str = "round_robin",
    seed: int = 0,
    target_groups: Sequence[Hashable] | None = None,
    num_rows: int | None = None,
) -> Tensor:
    """
    Choose `budget` distinct pool rows from influence scores.

    scores: float Tensor [n, m] (pool rows x target columns, higher = more helpful), or an iterable of
        (start, chunk [rows, m]) pairs covering rows 0..n-1 consecutively; both give identical results.
    budget: number of rows to select, 1 <= budget <= n (an int; see resolve_budget for fractions).
    rule: one of RULES (see the module docstring).
    seed: seeds the round-robin visiting order; the top-k rules are deterministic anyway.
    target_groups: m hashable task labels, one per target column. Required for "round_robin_task",
        optional for "less" (default: every column its own task), not accepted by the other rules.
    num_rows: n, optional; when given, the budget is checked before streaming and the stream must have n rows.
    Returns: LongTensor [budget] of pool row indices (CPU) in selection order: picking order for the
        round-robin rules, descending key (ties by lower row) for the top-k rules.
    """
    if rule == "facility_location":
        if target_groups is not None:
            raise SelectionError("rule 'facility_location' does not use target_groups")
        matrix = scores if isinstance(scores, Tensor) else torch.cat([_promoted(chunk)
                                                                      for _, chunk in _chunks(scores, num_rows)])
        return facility_location(matrix, budget)
    _check_rule(rule, target_groups)
    _count(budget, num_rows)  # fail before streaming; without num_rows the size is checked at the end
    _generator(seed)  # validates the seed before streaming, too
    return top_candidates(scores, budget, rule, target_groups, num_rows).select(budget, seed)


def facility_location(scores: Tensor, budget: int) -> Tensor:
    """
    Greedy facility location (DELIFT's subset objective over the targets): maximise
    F(S) = sum_j max_{i in S} s'_ij with s' = scores - min(scores) >= 0, by lazy greedy.

    F is monotone submodular, so greedy is within 1 - 1/e of the optimum, and a row's gain can only shrink as
    S grows: a stale gain is an upper bound, and a row whose refreshed gain still tops the heap is the greedy
    choice without re-evaluating the others. Holds the [n, m] matrix in memory (not streaming).

    scores: [n, m]; returns LongTensor [budget] in picking order (ties by lower row).
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise SelectionError(f"facility_location needs a non-empty [n, m] score matrix, got {list(scores.shape)}")
    _count(budget, scores.shape[0])
    values = scores.detach().double().cpu()
    if not bool(torch.isfinite(values).all()):
        row, column = (~torch.isfinite(values)).nonzero()[0].tolist()
        raise SelectionError(f"non-finite score at pool row {row}, target column {column}")
    values = values - values.min()
    covered = torch.zeros(values.shape[1], dtype=torch.float64)
    gains = values.sum(1)
    # heapq is a min-heap: store (-gain, row) so the largest gain, then the lowest row, pops first.
    heap = [(-gain, row) for row, gain in enumerate(gains.tolist())]
    heapq.heapify(heap)
    chosen: list[int] = []
    while len(chosen) < budget:
        _, row = heapq.heappop(heap)
        gain = float((values[row] - covered).clamp_min(0.0).sum())
        # (-gain, row) orders by gain, then lower row; stale entries only overestimate their gains.
        if not heap or (-gain, row) <= heap[0]:
            chosen.append(row)
            covered = torch.maximum(covered, values[row])
        else:
            heapq.heappush(heap, (-gain, row))
    return torch.tensor(chosen, dtype=torch.long)


def weighted_sample(weights: Tensor, budget: int, seed: int = 0) -> Tensor:
    """
    Draw `budget` distinct rows without replacement, each draw proportional to the remaining weights.

    weights: [n] non-negative finite weights (any real dtype); rows of weight 0 are never drawn.
    budget: number of rows, 1 <= budget <= number of positive weights.
    Returns: LongTensor [budget] of row indices (CPU) in drawing order.
    """
    weights = torch.as_tensor(weights).detach().cpu().double()
    if weights.dim() != 1:
        raise SelectionError(f"weights must be 1-D [pool], got shape {tuple(weights.shape)}")
    budget = _count(budget, len(weights))
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise SelectionError(f"weights must be finite and >= 0, row {row} has {weights[row].item()}")
    positive = int((weights > 0).sum())
    if positive < budget:
        raise SelectionError(f"only {positive} rows have a positive weight, budget is {budget}")
    # Exponential race (Efraimidis-Spirakis): the row with the smallest Exp(1) / w_i is drawn first with
    # probability w_i / sum(w), and by memorylessness the order of the keys is the draw order. Unlike
    # torch.multinomial it has no 2**24 category limit.
    race = torch.empty(len(weights), dtype=torch.float64).exponential_(generator=_generator(seed))
    keys = torch.where(weights > 0, race / weights, math.inf)
    return keys.sort(stable=True).indices[:budget]


Lazy = Tensor | Callable[[], Tensor] | None


def choose_rows(budget: int, rule: str, seed: int = 0, *, scores: Lazy = None, weights: Lazy = None, stream=None,
                target_groups: Sequence[Hashable] | None = None, selectable: Tensor | None = None) -> Tensor:
    """
    The one step from scores to rows (the facade, the engine, the trainer and pretrained networks all call it).

    budget: rows to select (an int, resolved already). rule: a name in RULE_TABLE. seed: the rule's seed.
    scores: [n, m] (or a function returning it, called only when the rule reads scores and no stream serves it).
    weights: [n] per-row weights, or a function returning them (called only for rule "weighted").
    stream: an object with select(budget, rule, seed, target_groups) (streaming.ScoreStream), used for the
        streaming rules instead of `scores`.
    target_groups: [m] task labels; passed only to the rules that group (others ignore them).
    selectable: [n] bool, the rows the rule may pick (None: all); not with a stream.
    Returns: LongTensor [budget] of pool rows (into the n rows), in selection order.
    Raises: SelectionError (unknown rule, budget above the selectable rows, missing weights, bad scores).
    """
    if rule not in RULE_TABLE:
        raise SelectionError(f"rule must be one of {tuple(RULE_TABLE)}, got {rule!r}")
    spec = RULE_TABLE[rule]
    groups = target_groups if spec.grouped else None
    if stream is not None and spec.streams:
        return stream.select(budget, rule, seed, groups)
    rows = None if selectable is None else selectable.nonzero().squeeze(1)
    if rows is not None and budget > len(rows):
        raise SelectionError(f"budget {budget} is larger than the {len(rows)} selectable pool rows (the method "
                             f"leaves {len(selectable) - len(rows)} rows out of the selection).")
    if spec.weights:
        values = weights() if callable(weights) else weights
        if values is None:
            raise SelectionError("rule 'weighted' needs per-row weights, and this run has none")
        chosen = weighted_sample(values if rows is None else values[rows], budget, seed=seed)
    else:
        values = scores() if callable(scores) else scores
        if values is None:
            raise SelectionError(f"rule {rule!r} needs the score matrix, and this run has none")
        chosen = select_indices(values if rows is None else values[rows], budget, rule=rule, seed=seed,
                                target_groups=groups)
    return chosen if rows is None else rows[chosen]
