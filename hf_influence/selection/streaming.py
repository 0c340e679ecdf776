"""
Streaming selection for pools of millions of rows (docs/algorithms.md §1.4, §1.6).

stream_select reads the pool's embeddings [n, e] (a memory-mapped VectorStore, fp16 or fp32, or a tensor /
array) block by block, predicts each block's scores [rows, m] with a fitted predictor, and keeps per target
only its running best `budget` candidates; it never holds the [n, m] score matrix, the [n, k] kernel or the
[n, e] embeddings. Predictors:

- LandmarkRegressor (kernel ridge regression from landmark embeddings, rbf or linear kernel), x centred on the
  landmark mean c first (x <- x - c), offset [m] the intercept:
    rbf:    P_hat = exp(-(|x|^2 + |l|^2 - 2 x.l) / (2 sigma^2)) alpha + offset, distances from one matmul
    linear: P_hat = x (E_L^T alpha) + offset, with E_L^T alpha [e, m] formed once in float64
  in compute_dtype (float32 by default: the rbf kernel costs rows x e x k multiply-adds, 2x slower in float64).
- InfluenceNetwork (NN-CIFT): its factorised predict, pairwise ([rows, m] against target embeddings) or
  pointwise (one column).

Rules: round_robin, round_robin_task, mean_top_k and less, with exactly the semantics of select_indices.

Exactness. BLAS results depend on the matrix shapes (a row multiplied alone or inside a batch of 1024 can
differ in the last bit), so scores are computed in fixed blocks of block_rows pool rows aligned to the pool
index, whatever chunk_rows is: a row's score is bitwise the same for every chunk_rows and equals row i of
predict_scores(...) with the same block_rows. stream_select(...) therefore returns exactly
select_indices(predict_scores(...), ...): same rows, same order, ties to the lower row.

Memory (bounded independently of n):
    block_rows x (e + k)           one block of embeddings and its [block_rows, k] kernel (compute dtype)
  + (chunk_rows + block_rows) x m  the scores of one chunk
  + c x (budget + slack)           candidates, slack = max(chunk_rows, budget // 4): a key and an int32 row
                                   (int64 past 2**31 rows) each, c = m targets (round_robin), the number of
                                   tasks (round_robin_task) or 1 (top-k rules)
  + k x (e + m)                    the predictor (landmarks and alpha)
i.e. O(chunk x landmarks + targets x budget).
"""

import numbers
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .landmarks import LandmarkRegressor
from ..networks.network import InfluenceNetwork
from .rules import RULES, Candidates, SelectionError, select_indices, top_candidates
from ..extraction.store import IncompleteStoreError, VectorStore

Predictor = LandmarkRegressor | InfluenceNetwork
# Pool rows per prediction block, the default of every function here (see Exactness in the module docstring).
BLOCK_ROWS = 2048


class _KernelRidgeBlocks:
    """Scores [rows, m] of embedding blocks from a fitted LandmarkRegressor, computed in `dtype`."""

    def __init__(self, regressor: LandmarkRegressor, dtype: torch.dtype):
        if not hasattr(regressor, "alpha"):
            raise ValueError("the LandmarkRegressor is not fitted: call fit(landmark_embeddings, landmark_scores)")
        self.dtype, self.out_dtype, self.kernel = dtype, regressor.scores_dtype, regressor.kernel
        self.dim, self.width = regressor.landmarks.shape[1], regressor.alpha.shape[1]
        self.device = regressor.alpha.device
        self.center, self.offset = regressor.center.to(dtype), regressor.offset.to(dtype)
        if self.kernel == "linear":
            # ((x - c) E_L^T) alpha = (x - c) (E_L^T alpha): [e, m] instead of a [rows, k] kernel, k / m times
            # fewer flops.
            self.weights = (regressor.landmarks.T @ regressor.alpha).to(dtype)
        else:
            self.landmarks = regressor.landmarks.to(dtype)
            self.landmark_norms = regressor.landmarks.square().sum(1).to(dtype)
            self.alpha = regressor.alpha.to(dtype)
            self.exponent_scale = -1.0 / (2.0 * regressor.sigma * regressor.sigma)

    def __call__(self, block: Tensor) -> Tensor:
        # Centred on the landmark mean, as the regression was fitted (see LandmarkRegressor).
        x = block.to(device=self.device, dtype=self.dtype) - self.center
        if self.kernel == "linear":
            return torch.addmm(self.offset, x, self.weights).to(self.out_dtype)
        # One [rows, k] buffer, updated in place: |l|^2 - 2 x.l, + |x|^2, clamped (rounding can make a
        # near-zero distance negative), scaled, exponentiated.
        kernel = torch.addmm(self.landmark_norms, x, self.landmarks.T, alpha=-2.0)
        kernel.add_(x.square().sum(1, keepdim=True)).clamp_min_(0.0).mul_(self.exponent_scale).exp_()
        return torch.addmm(self.offset, kernel, self.alpha).to(self.out_dtype)


class _NetworkBlocks:
    """Scores [rows, m] (pairwise) or [rows, 1] (pointwise) of embedding blocks from a fitted InfluenceNetwork."""

    def __init__(self, network: InfluenceNetwork, target_embeddings: Tensor | None, embedding_model: str | None):
        if network.label_min is None or network.label_max is None:
            raise RuntimeError("this InfluenceNetwork has no label range: fit it (or load a fitted one) first")
        self.network, self.embedding_model = network, embedding_model
        self.dim = network.embedding_dim
        if network.kind == "pairwise":
            if target_embeddings is None:
                raise ValueError("a pairwise InfluenceNetwork needs target_embeddings [m, e] to score the pool")
            self.targets = torch.as_tensor(target_embeddings)
            network.check_embeddings(self.targets, embedding_model)
            self.width = self.targets.shape[0]
        else:
            if target_embeddings is not None:
                raise ValueError("a pointwise InfluenceNetwork scores pool rows alone: pass target_embeddings=None")
            self.targets, self.width = None, 1

    def __call__(self, block: Tensor) -> Tensor:
        # chunk_rows=len(block): predict then works on the whole block at once, so its tiling (and rounding)
        # depends on the block alone.
        if self.targets is None:
            return self.network.predict(block, chunk_rows=len(block), embedding_model=self.embedding_model)[:, None]
        return self.network.predict(block, self.targets, chunk_rows=len(block), embedding_model=self.embedding_model)


def _block_scorer(predictor: Predictor, target_embeddings: Tensor | None, compute_dtype: torch.dtype,
                  embedding_model: str | None):
    if isinstance(predictor, LandmarkRegressor):
        if target_embeddings is not None:
            raise ValueError("a LandmarkRegressor holds its targets in alpha [k, m]: pass target_embeddings=None")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        return _KernelRidgeBlocks(predictor, compute_dtype)
    if isinstance(predictor, InfluenceNetwork):
        return _NetworkBlocks(predictor, target_embeddings, embedding_model)
    raise TypeError(f"predictor must be a fitted LandmarkRegressor or InfluenceNetwork, got {type(predictor).__name__}")


def _row_reader(pool) -> tuple[int, int, Callable[[int, int], Tensor]]:
    """(n, e, read(start, end) -> rows [end - start, e]) for a VectorStore, a Tensor or an array-like with .shape."""
    if isinstance(pool, VectorStore):
        if not pool.is_complete():
            missing = len(pool) - pool.rows_done
            first = int(pool.pending_rows()[0])
            raise IncompleteStoreError(
                f"{missing} of the {len(pool)} rows of the store at {pool.path} have not been written (first: row "
                f"{first}); finish (resume) the extraction before selecting from it")
        return len(pool), pool.dim, lambda start, end: torch.from_numpy(pool.read(start, end, require_complete=False))
    shape = tuple(getattr(pool, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"pool must be a VectorStore or a 2-D [rows, dim] tensor or array, got shape {shape}")
    if isinstance(pool, Tensor):
        return shape[0], shape[1], lambda start, end: pool[start:end]

    def read(start: int, end: int) -> Tensor:
        rows = pool[start:end]
        # A read-only memory map is copied (one block): torch cannot wrap a non-writable array.
        return rows if isinstance(rows, Tensor) else torch.from_numpy(np.require(rows, requirements="W"))

    return shape[0], shape[1], read


def _exact_overrides(exact_rows, exact_scores, exact_columns, n: int,
                     width: int) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Validate and sort (rows [r], scores [r, c], columns [c] or None for all `width`) whose known scores
    replace the predictions."""
    if exact_rows is None and exact_scores is None:
        if exact_columns is not None:
            raise ValueError("exact_columns needs exact_rows and exact_scores")
        return None
    if exact_rows is None or exact_scores is None:
        raise ValueError("give both exact_rows and exact_scores, or neither")
    rows = torch.as_tensor(exact_rows).reshape(-1)
    scores = torch.as_tensor(exact_scores)
    if scores.dim() == 1:
        scores = scores[:, None]
    columns = None
    if exact_columns is not None:
        columns = torch.as_tensor(exact_columns).reshape(-1).long()
        if len(columns) and (columns.min() < 0 or columns.max() >= width or len(columns.unique()) < len(columns)):
            raise ValueError(f"exact_columns must be distinct target columns in [0, {width}), got {columns.tolist()}")
        width = len(columns)
    if rows.dtype.is_floating_point or rows.dtype == torch.bool:
        raise ValueError(f"exact_rows must be integer row indices, got dtype {rows.dtype}")
    if tuple(scores.shape) != (len(rows), width):
        raise ValueError(f"exact_scores must have shape [{len(rows)}, {width}] (exact_rows x "
                         f"{'exact_columns' if columns is not None else 'target columns'}), "
                         f"got {list(scores.shape)}")
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        bad = rows[(rows < 0) | (rows >= n)][0].item()
        raise ValueError(f"exact_rows holds row {bad}, outside the pool's rows [0, {n})")
    rows, order = rows.long().sort()
    if len(rows) > 1 and bool((rows[1:] == rows[:-1]).any()):
        raise ValueError(f"exact_rows holds row {rows[1:][rows[1:] == rows[:-1]][0].item()} more than once")
    return rows, scores[order], columns


def iter_scores(
    pool,
    predictor: Predictor,
    target_embeddings: Tensor | None = None,
    *,
    chunk_rows: int = 16384,
    block_rows: int = BLOCK_ROWS,
    compute_dtype: torch.dtype = torch.float32,
    exact_rows: Tensor | None = None,
    exact_scores: Tensor | None = None,
    exact_columns: Tensor | None = None,
    embedding_model: str | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """
    Predicted scores of the pool, chunk by chunk: yields (start, scores [rows, m]) for rows start..start+rows-1,
    consecutive from 0, the input select_indices streams.

    pool: VectorStore (complete; read through its memory maps, fp16 or fp32), Tensor [n, e], or any array-like
        with .shape (n, e) and row slicing (a np.memmap, a generator of synthetic rows).
    predictor: fitted LandmarkRegressor (target_embeddings=None) or InfluenceNetwork (pairwise: target_embeddings
        [m, e]; pointwise: None, one column).
    chunk_rows: rows per yielded chunk (the last may be shorter). block_rows: rows per prediction block; blocks
        start at multiples of block_rows, so the scores do not depend on chunk_rows (see the module docstring).
    compute_dtype: float32 or float64, for LandmarkRegressor (a network computes in its parameters' dtype).
        Scores come out in the regressor's scores dtype (that of its landmark scores) or the network's.
    exact_rows [r], exact_scores [r, m]: rows whose scores are known (landmarks) and replace the prediction;
        with exact_columns [c], exact_scores is [r, c] and replaces only those columns (a known sub-block).
    embedding_model: encoder id of the embeddings, checked against an InfluenceNetwork's.
    Memory: O(block_rows x (e + k) + (chunk_rows + block_rows) x m); nothing of size n.
    """
    return _scored_chunks(pool, predictor, target_embeddings, chunk_rows, block_rows, compute_dtype, exact_rows,
                          exact_scores, exact_columns, embedding_model)[1]


def _scored_chunks(pool, predictor, target_embeddings, chunk_rows, block_rows, compute_dtype, exact_rows, exact_scores,
                   exact_columns, embedding_model) -> tuple[int, Iterator[tuple[int, Tensor]]]:
    """(n, the iter_scores stream): every argument is checked now, the pool is read as the stream is consumed."""
    n, read, score_block, overrides = _prepare(pool, predictor, target_embeddings, chunk_rows, block_rows,
                                               compute_dtype, exact_rows, exact_scores, exact_columns, embedding_model)
    return n, _rechunk(_blocks(n, read, score_block, block_rows, overrides), n, chunk_rows)


def _prepare(pool, predictor, target_embeddings, chunk_rows, block_rows, compute_dtype, exact_rows, exact_scores,
             exact_columns, embedding_model):
    """Check every argument before any work: (n, read, block scorer, exact overrides or None)."""
    for name, value in (("chunk_rows", chunk_rows), ("block_rows", block_rows)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    n, dim, read = _row_reader(pool)
    if n == 0:
        raise ValueError("the pool is empty (0 rows): nothing to score or select")
    score_block = _block_scorer(predictor, target_embeddings, compute_dtype, embedding_model)
    if dim != score_block.dim:
        raise ValueError(f"the pool's embeddings have dimension {dim} but the {type(predictor).__name__} expects "
                         f"{score_block.dim}: they come from different embedders or projections")
    return n, read, score_block, _exact_overrides(exact_rows, exact_scores, exact_columns, n, score_block.width)


def _blocks(n: int, read, score_block, block_rows: int, overrides) -> Iterator[Tensor]:
    """Scores of consecutive fixed blocks [start, start + block_rows) of the pool."""
    for start in range(0, n, block_rows):
        end = min(start + block_rows, n)
        scores = score_block(read(start, end))
        if overrides is not None:
            rows, exact, columns = overrides
            lo, hi = torch.searchsorted(rows, torch.tensor([start, end])).tolist()
            if hi > lo:
                positions = rows[lo:hi].to(scores.device) - start
                values = exact[lo:hi].to(device=scores.device, dtype=scores.dtype)
                if columns is None:
                    scores[positions] = values
                else:  # a known sub-block (NN-CIFT's oracle block): only those target columns
                    scores[positions.unsqueeze(1), columns.to(scores.device).unsqueeze(0)] = values
        yield scores


def _rechunk(blocks: Iterator[Tensor], n: int, chunk_rows: int) -> Iterator[tuple[int, Tensor]]:
    """Re-cut a stream of row blocks into (start, chunk) pairs of chunk_rows rows (the last may be shorter)."""
    pending: list[Tensor] = []
    pending_rows = start = 0
    for block in blocks:
        pending.append(block)
        pending_rows += len(block)
        while pending_rows >= chunk_rows or (pending_rows and start + pending_rows == n):
            merged = pending[0] if len(pending) == 1 else torch.cat(pending)
            chunk = merged[:chunk_rows]
            yield start, chunk
            start += len(chunk)
            pending = [merged[len(chunk):]] if len(merged) > len(chunk) else []
            pending_rows = len(merged) - len(chunk)


def predict_scores(pool, predictor: Predictor, target_embeddings: Tensor | None = None, *, block_rows: int = BLOCK_ROWS,
                   compute_dtype: torch.dtype = torch.float32, exact_rows: Tensor | None = None,
                   exact_scores: Tensor | None = None, exact_columns: Tensor | None = None,
                   embedding_model: str | None = None) -> Tensor:
    """
    The whole [n, m] score matrix that stream_select selects from (same blocks, same bits), for pools that fit
    in memory: select_indices(predict_scores(pool, predictor, ...), ...) == stream_select(pool, predictor, ...).
    Arguments as in iter_scores.
    """
    chunks = iter_scores(pool, predictor, target_embeddings, chunk_rows=block_rows, block_rows=block_rows,
                         compute_dtype=compute_dtype, exact_rows=exact_rows, exact_scores=exact_scores,
                         exact_columns=exact_columns, embedding_model=embedding_model)
    return torch.cat([chunk for _, chunk in chunks])


def stream_select(
    pool,
    predictor: Predictor,
    budget: int,
    rule: str = "round_robin",
    *,
    target_embeddings: Tensor | None = None,
    target_groups: Sequence[Hashable] | None = None,
    seed: int = 0,
    chunk_rows: int = 16384,
    block_rows: int = BLOCK_ROWS,
    compute_dtype: torch.dtype = torch.float32,
    exact_rows: Tensor | None = None,
    exact_scores: Tensor | None = None,
    exact_columns: Tensor | None = None,
    embedding_model: str | None = None,
) -> Tensor:
    """
    Select `budget` pool rows by predicted influence without ever holding more than a chunk of the pool: the
    predicted chunks go straight into `select_indices`, the one implementation of every rule.

    pool: VectorStore (memory-mapped, fp16 or fp32; must be complete), Tensor [n, e], or array-like with
        .shape (n, e) and row slicing.
    predictor: fitted LandmarkRegressor (its alpha holds the m targets) or InfluenceNetwork (pairwise with
        target_embeddings [m, e], or pointwise: one column).
    budget: rows to select, an int 1 <= budget <= n (resolve_budget turns a fraction into one).
    rule: "round_robin", "round_robin_task" (needs target_groups), "mean_top_k" or "less" (see selection/rules.py).
    target_groups: m task labels, one per target column (round_robin_task; optional for less).
    seed: the round-robin visiting order. chunk_rows, block_rows, compute_dtype, exact_rows, exact_scores,
        exact_columns, embedding_model: see iter_scores.

    Returns: LongTensor [budget] of pool rows in selection order, identical to
        select_indices(predict_scores(pool, predictor, ..., block_rows=block_rows), budget, rule, seed, ...)
        for every chunk_rows.
    Memory: O(block_rows x (e + k) + chunk_rows x m + c x (budget + max(chunk_rows, budget // 4))), c = m, the
        number of tasks, or 1 (module docstring), independent of n; time linear in n.
    Raises: SelectionError (budget, rule, groups, seed, non-finite scores), ValueError (dimension mismatch,
        empty pool, bad chunk sizes), IncompleteStoreError (unwritten store rows).
    """
    if rule not in RULES:
        raise SelectionError(f"stream_select supports the streaming rules {RULES}, got {rule!r}"
                             + (" (facility_location needs the whole score matrix: use select_indices)"
                                if rule == "facility_location" else ""))
    n, chunks = _scored_chunks(pool, predictor, target_embeddings, chunk_rows, block_rows, compute_dtype, exact_rows,
                               exact_scores, exact_columns, embedding_model)
    return select_indices(chunks, budget, rule=rule, seed=seed, target_groups=target_groups, num_rows=n)


@dataclass
class ScoreStream:
    """Scores [n, m] left as a fitted predictor over the pool's embeddings (a VectorStore read in blocks, or a
    tensor), with the known scores (landmark rows, or NN-CIFT's oracle block) as exact values: `select` never
    holds more than a chunk of the pool (see selection/streaming.py)."""

    embeddings: VectorStore | Tensor  # [n, e]
    predictor: LandmarkRegressor | InfluenceNetwork
    exact: dict[str, Tensor] = field(default_factory=dict)  # exact_rows [r], exact_scores [r, m or c], optionally
    # exact_columns [c]: the known scores (landmarks, an oracle block), which replace the predictions
    chunk_rows: int = 16384
    target_embeddings: Tensor | None = None  # [m, e], for a pairwise InfluenceNetwork
    embedding_model: str | None = None  # the embeddings' encoder, checked against an InfluenceNetwork's
    block_rows: int = BLOCK_ROWS  # rows per prediction block (the same blocks in select, candidates and scores)
    # What a pass over these very scores kept (a method that already streamed them, e.g. for a shortlist):
    # a selection it serves needs no new pass.
    retained: Candidates | None = None

    def candidates(self, keep: int, rule: str, target_groups=None) -> Candidates:
        """
        One pass over the pool that keeps each key column's best `keep` rows (selection.Candidates; c = m targets,
        the number of tasks, or 1), so that several selections need no second pass: candidates(keep).select(budget,
        seed) == select(budget, rule, seed, ...) for every budget <= keep, and after `.replaced(rows, scores)` (some
        rows' scores made exact) the selection a stream with those rows among its exact ones would make, for every
        budget <= keep - len(rows). Memory: O(block x (e + k) + chunk_rows x m + c x keep), independent of n.
        """
        if rule not in RULES:
            raise SelectionError(f"candidates supports the streaming rules {RULES}, got {rule!r}")
        n, chunks = _scored_chunks(self.embeddings, self.predictor, self.target_embeddings, self.chunk_rows,
                                   self.block_rows, torch.float32, self.exact.get("exact_rows"),
                                   self.exact.get("exact_scores"), self.exact.get("exact_columns"),
                                   self.embedding_model)
        return top_candidates(chunks, min(keep, n), rule, target_groups, num_rows=n)

    def select(self, budget: int, rule: str, seed: int, target_groups=None) -> Tensor:
        """stream_select: the rows select_indices(self.scores(), ...) would pick, in the same order."""
        if self.retained is not None and self.retained.serves(budget, rule, target_groups):
            return self.retained.select(budget, seed)
        return stream_select(self.embeddings, self.predictor, budget, rule, target_embeddings=self.target_embeddings,
                             target_groups=target_groups, seed=seed, chunk_rows=self.chunk_rows,
                             block_rows=self.block_rows, embedding_model=self.embedding_model, **self.exact)

    def scores(self) -> Tensor:
        """The whole [n, m] matrix (same blocks, same bits as `select`)."""
        return predict_scores(self.embeddings, self.predictor, self.target_embeddings, block_rows=self.block_rows,
                              embedding_model=self.embedding_model, **self.exact)
