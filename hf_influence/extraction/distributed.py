"""Multi-process extraction: processes launched together (accelerate launch, torchrun; one per GPU, any number of
nodes) fill one `VectorStore`.

Every process calls the same extraction function (`extract_gradients`, `extract_jvp_embeddings`,
`extract_sentence_embeddings`) with the same model, rows and config. The store's fixed batches
[b * batch_size, (b + 1) * batch_size) that are still pending are split contiguously between the processes
(accelerate's `PartialState.split_between_processes`); each process computes its own batches with its own copy
of the model, which is never wrapped in DDP (DDP would average gradients across processes), and writes the rows
into the shared memory-mapped store. The steps, each ending in a collective that every process reaches:

1. process 0 creates the store, or checks that the one on disk was made for this model, data and config
   (`VectorStore.create_or_open`); the others wait;
2. every process opens it with `multi_writer=True`, checks it against its own spec (all processes must hold
   the same data) and lists the pending batches; nobody writes before everyone has listed them;
3. each process writes its share; the data of a row is on disk before its done flag;
4. process 0 reopens the store, checks that every row is written and rewrites the manifest (`rows_done`);
5. every process returns the completed store, opened read-only.

If any process fails in a step, every process raises at the end of that step (the others name the failing
processes) instead of waiting for it forever. A process that dies outright is the launcher's to notice: torchrun
then stops the others. Relaunching with any number of processes recomputes only the batches not marked done,
and since a batch always sees the same rows and padding, the finished store is byte-identical (manifest
included) to the one a single process writes in one go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import get_int_from_env, parse_flag_from_env, reduce
from transformers.utils.logging import tqdm

from .store import IncompleteStoreError, StoreSpec, VectorStore
from ..verbosity import get_logger

logger = get_logger(__name__)

T = TypeVar("T")

# The variables accelerate's PartialState reads for the number of processes (torchrun / accelerate, MPI).
_WORLD_SIZE_VARIABLES = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


def process_state() -> PartialState | None:
    """accelerate's `PartialState` when this process was launched as one of several, else None.

    A single process gets None and never touches accelerate's global state, so an `Accelerator` created later
    (the warm-up's Trainer) is configured as it would be without us.
    """
    if get_int_from_env(_WORLD_SIZE_VARIABLES, 1) <= 1:
        return None
    # PartialState only recognises a CPU launch (torchrun without GPUs, accelerate launch --cpu) when asked
    # for cpu=True; AcceleratorState reads ACCELERATE_USE_CPU the same way. torch.accelerator needs torch >= 2.6.
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)


def fill_store(
    path: str | Path,
    spec: StoreSpec,
    compute: Callable[[int, int], torch.Tensor | np.ndarray],
    batch_size: int,
    row_ids: np.ndarray | torch.Tensor | Iterable[int] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    description: str = "rows",
) -> VectorStore:
    """Create (or resume) the store `spec` describes at `path` and write every pending batch, in one process or
    split between all the processes of a multi-process launch.

    Args:
        path: store directory (shared by all processes: one file system, local or network).
        spec: what the store holds; an existing store is resumed only if made for the same spec and row ids.
        compute: `compute(start, end)` returns rows [end - start, spec.dim] (float, any device) for store rows
            [start, end); it must be a pure function of the rows, so that a recomputed batch gives the same bytes.
        batch_size: rows per batch; batch boundaries are fixed multiples of it, so resume with the same value.
        row_ids: int [spec.num_rows]: dataset row id of each store row, or None.
        overwrite: start afresh even when `path` holds a matching (or another) store.
        show_progress: progress bar (on process 0, for its own share of the rows).
        description: progress bar label.

    Returns:
        The completed store. A single process gets the store it wrote (mode "r+"); under a multi-process
        launch every process gets it reopened read-only, after process 0 has written the final manifest.

    Raises:
        StoreMismatchError: `path` holds a store made for another spec or other row ids (and not `overwrite`).
        RuntimeError: another process of the launch failed (its own error is raised there).

    Under a multi-process launch every process must call this with the same arguments (the same spec, batch
    size and row ids); `compute` is called only for that process's batches.
    """
    state = process_state()
    if state is None:
        store = VectorStore.create_or_open(path, spec, row_ids=row_ids, overwrite=overwrite)
        pending = store.pending_batches(batch_size)
        progress = tqdm(total=len(store), initial=len(store) - sum(end - start for start, end in pending),
                        desc=description, unit="rows", disable=not show_progress)
        with progress:
            for start, end in pending:
                store.write(start, compute(start, end))
                progress.update(end - start)
        store.update_manifest()
        return store

    main = state.is_main_process
    _step(state, f"creating or opening the store at {path}",
          (lambda: VectorStore.create_or_open(path, spec, row_ids=row_ids, overwrite=overwrite)) if main else None)
    # Also the barrier that keeps everyone from writing before all have listed the same pending batches.
    store, pending = _step(state, f"opening the store at {path}",
                           lambda: _open_shared(path, spec, row_ids, batch_size))
    if main:
        logger.info("%s: %d of %d batches pending, split between %d processes", description, len(pending),
                    -(-len(store) // batch_size), state.num_processes)
    with state.split_between_processes(pending) as mine:
        progress = tqdm(total=sum(end - start for start, end in mine), unit="rows",
                        desc=f"{description} (process 0 of {state.num_processes})", disable=not show_progress or not main)
        with progress:
            _step(state, f"writing their batches of the store at {path}",
                  lambda: _write_batches(store, mine, compute, progress))
    _step(state, f"finalising the store at {path}", (lambda: _finalise(path)) if main else None)
    return VectorStore.open(path, mode="r")


def _open_shared(
    path: str | Path, spec: StoreSpec, row_ids: np.ndarray | torch.Tensor | Iterable[int] | None, batch_size: int
) -> tuple[VectorStore, list[tuple[int, int]]]:
    """The store opened for writing by several hosts, checked against this process's spec, and its pending
    batches."""
    store = VectorStore.open(path, mode="r+", multi_writer=True)
    store.check_spec(spec, row_ids)
    return store, store.pending_batches(batch_size)


def _write_batches(
    store: VectorStore,
    batches: list[tuple[int, int]],
    compute: Callable[[int, int], torch.Tensor | np.ndarray],
    progress: tqdm,
) -> None:
    for start, end in batches:
        store.write(start, compute(start, end))
        progress.update(end - start)


def _finalise(path: str | Path) -> None:
    """Check that every row is written and rewrite the manifest (rows_done), as the single process does."""
    # A fresh store: maps opened before the other processes wrote may be stale on a network file system.
    store = VectorStore.open(path, mode="r+")
    if not store.is_complete():
        missing = store.pending_rows()
        raise IncompleteStoreError(
            f"every process finished, but {len(missing)} rows of the store at {path} are not marked written (first: "
            f"{missing[:5].tolist()}); were all processes given the same arguments? Relaunch to compute them."
        )
    store.update_manifest()


def run_on_main(state: PartialState | None, step: str, action: Callable[[], T]) -> T | None:
    """`action()` on process 0 only (a single process: here), then meet the other processes; an error there is
    raised on every process (see `_step`). Returns the action's result on process 0, None elsewhere."""
    if state is None:
        return action()
    return _step(state, step, action if state.is_main_process else None)


def _step(state: PartialState, step: str, action: Callable[[], T] | None) -> T | None:
    """Run `action` (None: nothing to do on this process), then meet the other processes: a collective every
    process must reach. An error is raised where it happened, and a RuntimeError naming the failed processes
    everywhere else, so that no process waits for one that has given up."""
    result, error = None, None
    if action is not None:
        try:
            result = action()
        except Exception as caught:  # noqa: BLE001 - raised below, once the other processes know of it
            error = caught
    failed = torch.zeros(state.num_processes, dtype=torch.int64, device=state.device)
    failed[state.process_index] = error is not None
    failed = reduce(failed, reduction="sum")
    if error is not None:
        raise error
    if failed.any():
        ranks = failed.nonzero().flatten().tolist()
        raise RuntimeError(
            f"process(es) {ranks} of {state.num_processes} failed while {step}; their own error is in their output"
        )
    return result
