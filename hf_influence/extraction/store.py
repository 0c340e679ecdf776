"""On-disk, memory-mapped, sharded store for per-sample vectors (gradients, embeddings).

A store is a directory::

    manifest.json      what the vectors are (model, dataset, config, shape, dtype); written last;
                       once every row is done it also records a SHA-256 of each file ("checksums")
    shard-00000.npy    rows [0, shard_rows) as a preallocated .npy array [shard_rows, dim]
    shard-00001.npy    rows [shard_rows, 2 * shard_rows) ...; the last shard is shorter
    done.npy           uint8 [num_rows]; 1 = the row's data has been written and flushed
    row_ids.npy        optional int64 [num_rows]: store row -> row id in the original dataset
    row_digests.npy    uint8 [num_rows, 8]: the start of each row's SHA-256, written with the row

Crash safety rests on two orderings:

* Creation writes every array file first and ``manifest.json`` last (atomically), so a directory
  without a manifest is an unfinished creation and is rebuilt from scratch.
* :meth:`VectorStore.write` flushes a row's data to disk before it sets and flushes the row's
  ``done`` flag, so a crash at any point never marks an unwritten row as done. Rows whose flag is
  0 are recomputed on resume; since work is split into batches with fixed boundaries
  (:meth:`VectorStore.pending_batches`), a recomputed batch is byte-identical to the original.

A row changed on disk after it was written (between a crash and its resume, say) no longer matches its digest:
a resumed store computes such rows again (with a warning), and sealing refuses a store that still has one, so the
checksums never seal damage in.

A complete store is sealed: the owner's :meth:`VectorStore.update_manifest` records the SHA-256 of every
shard, ``done.npy``, ``row_ids.npy`` and ``row_digests.npy``, and every later open verifies them, so flipped or overwritten bytes
are refused instead of read. Verifying reads the whole store once per open: 1.5 GB/s of hashing on one core of
the build machine with a warm page cache (benchmarks/store_checksums.py: 44 ms for 64 MB), plus any disk read.

Several processes may write one store at once, each its own disjoint rows; only the process that
created the store (rank 0) calls :meth:`VectorStore.update_manifest`. On one host, where all of
them share the page cache, ``VectorStore.open(path, mode="r+")`` is enough. Processes on several
hosts over a network file system open it with ``multi_writer=True`` (see
:meth:`VectorStore.open`); :mod:`hf_influence.extraction.distributed` does this for multi-process extraction.
"""

import contextlib
import copy
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.lib.format import open_memmap

from ..errors import HFInfluenceError
from ..verbosity import get_logger

logger = get_logger(__name__)

FORMAT_VERSION = 1
# How every message that offers to start a store afresh names the option, for API and CLI users alike.
OVERWRITE = "overwrite=True (CLI: --overwrite)"
MANIFEST_NAME = "manifest.json"
DONE_NAME = "done.npy"
ROW_IDS_NAME = "row_ids.npy"
# The first DIGEST_BYTES of each row's SHA-256, written with the row: a row changed on disk after it was written
# (between a crash and its resume, say) is found before the store is sealed, instead of being sealed with it.
DIGESTS_NAME, DIGEST_BYTES = "row_digests.npy", 8
SHARD_GLOB = "shard-*.npy"
STORE_DTYPES = ("float16", "float32", "float64")

# Manifest fields that must match for a store to be resumed rather than rebuilt.
IDENTITY_FIELDS = (
    "kind",
    "model_id",
    "model_revision",
    "dataset_fingerprint",
    "config_hash",
    "num_rows",
    "dim",
    "dtype",
    "shard_rows",
)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 hex digest (64 chars) of the canonical JSON of ``config``.

    Canonical JSON has sorted keys, no whitespace and no NaN/inf, so two configs that compare
    equal after a JSON round trip (tuples become lists) hash the same. Raises ``TypeError`` for
    values JSON cannot represent and ``ValueError`` for NaN/inf.
    """
    return hashlib.sha256(_canonical_json(config).encode("utf-8")).hexdigest()


def fingerprint_dataset(dataset: Any) -> str:
    """A string that changes whenever the dataset's content changes.

    For a ``datasets.Dataset`` this is its ``_fingerprint`` (16 hex chars), which the library
    derives from the data files and every transformation applied, at no cost. Anything without
    one (a list of dicts, a ``datasets.IterableDataset``) is hashed instead: the SHA-256 hex
    digest of the canonical JSON (sorted keys, no whitespace) of the list of its rows, which
    reads every row once. Such rows must be mappings of JSON values; NaN/inf are accepted and
    encoded as JSON's non-standard ``NaN``/``Infinity`` tokens.
    """
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str) and fingerprint:
        return fingerprint
    # Streamed so a large dataset is never held as one string; the digest equals that of
    # json.dumps(list(dataset), sort_keys=True, separators=(",", ":"), ensure_ascii=False).
    digest = hashlib.sha256(b"[")
    for index, row in enumerate(dataset):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"fingerprint_dataset expects a datasets.Dataset or an iterable of dict rows; "
                f"row {index} is a {type(row).__name__}"
            )
        if index:
            digest.update(b",")
        digest.update(_canonical_json(row, allow_nan=True).encode("utf-8"))
    digest.update(b"]")
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` so that readers and crashes see either the old
    or the new content, never a mix.

    The bytes go to a uniquely named temporary file in the same directory (``os.replace`` is only
    atomic within one file system), are fsynced, and the temporary file is renamed over ``path``;
    the directory is then fsynced so the rename itself survives a power loss. On any error the
    temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    # pid + random suffix: several processes may write next to each other in one directory.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 honours the umask, unlike tempfile's owner-only 0o600.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def folder_replacement(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a result of several files as one: yields a new sibling folder to write into; when the block ends
    without an error it takes `folder`'s place (the previous folder is kept until then, then removed), else it is
    deleted and `folder` is untouched. A crash leaves the old result or the new one, never a mix of the two
    (at worst a hidden `.NAME.*` sibling to delete)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    staging.mkdir(mode=0o777)  # honours the umask, like the folder it replaces
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically replace ``path`` with ``obj`` as indented, strict JSON (see
    :func:`atomic_write_bytes`).

    ``obj`` is serialised before anything touches the disk, so a value JSON cannot represent
    (``TypeError``) or NaN/inf (``ValueError``) leaves the old file intact and no temporary file.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass
class StoreSpec:
    """What a store holds, fixed at creation.

    Attributes:
        kind: What the vectors are, e.g. ``"gradients"`` or ``"jvp_embeddings"``.
        model_id: Hugging Face model id or local path of the model that produced the vectors.
        model_revision: Model commit hash or tag, ``None`` if unknown.
        dataset_fingerprint: See :func:`fingerprint_dataset`.
        config: JSON-able settings that change the vectors (projection dim, seed, layers, ...);
            stored in full and compared through :func:`config_hash`.
        num_rows: Number of vectors (store rows), >= 1.
        dim: Length of each vector, >= 1.
        dtype: On-disk element type: ``"float16"``, ``"float32"`` or ``"float64"``.
        shard_rows: Rows per shard file, >= 1; a shard takes ``shard_rows * dim * itemsize``
            bytes (65536 x 8192 float16 = 1 GiB).
        extra: Free-form JSON-able notes (timings, library versions); not part of the identity.
    """

    kind: str
    model_id: str
    model_revision: str | None
    dataset_fingerprint: str
    config: dict[str, Any]
    num_rows: int
    dim: int
    dtype: str = "float32"
    shard_rows: int = 65536
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {self.dtype!r}")
        for name in ("num_rows", "dim", "shard_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Fail now rather than after an expensive extraction when the manifest is written.
        config_hash(self.config)
        json.dumps(self.extra, allow_nan=False)

    def identity(self) -> dict[str, Any]:
        """The fields that must equal a stored manifest's for the store to be resumed:
        kind, model_id, model_revision, dataset_fingerprint, config_hash, num_rows, dim, dtype,
        shard_rows."""
        return {
            "kind": self.kind,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "dataset_fingerprint": self.dataset_fingerprint,
            "config_hash": config_hash(self.config),
            "num_rows": self.num_rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "shard_rows": self.shard_rows,
        }


class StoreMismatchError(HFInfluenceError, ValueError):
    """An existing store was made for something other than what is requested.

    Attributes:
        path: The store directory.
        differences: Field name -> (stored value, requested value), one entry per differing
            identity field (plus ``"row_ids"`` when those differ).
    """

    def __init__(self, path: Path, differences: dict[str, tuple[Any, Any]], detail: str = ""):
        self.path = path
        self.differences = differences
        lines = [f"The vector store at {path} was made for a different setup:"]
        lines += [
            f"  {name}: stored {stored!r}, requested {requested!r}"
            for name, (stored, requested) in differences.items()
        ]
        if detail:
            lines.append(detail)
        lines.append(
            f"Pass a new output directory to keep it, or {OVERWRITE} to delete it and start over."
        )
        super().__init__("\n".join(lines))


class CorruptStoreError(HFInfluenceError, ValueError):
    """A store file is missing, truncated, unreadable, or differs from the checksum recorded when the store
    was completed; the message names the file."""


class IncompleteStoreError(HFInfluenceError, RuntimeError):
    """Rows were read that have not been written yet (the extraction stopped early)."""


class VectorStore:
    """A memory-mapped [num_rows, dim] array split into shard files, plus per-row done flags.

    Get one with :meth:`create_or_open` (the process that owns the store) or :meth:`open`
    (readers, and other writer processes once the store exists). Reads copy out of the memory
    maps, so only the rows asked for are loaded.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        mode: Literal["r", "r+"],
        multi_writer: bool = False,
    ) -> None:
        """Map the files of an existing, complete-on-disk store; use :meth:`open` instead."""
        self._path = path
        self._manifest = manifest
        self._mode = mode
        self._multi_writer = multi_writer
        self._shards = [
            _open_array(path / _shard_name(index), mode, (rows, self.dim), self.dtype)
            for index, rows in enumerate(_shard_sizes(len(self), manifest["shard_rows"]))
        ]
        self._done = _open_array(path / DONE_NAME, mode, (len(self),), np.dtype(np.uint8))
        # Stores written before row digests existed have none: their rows are not verified.
        self._digests = (_open_array(path / DIGESTS_NAME, mode, (len(self), DIGEST_BYTES), np.dtype(np.uint8))
                         if (path / DIGESTS_NAME).exists() else None)
        _verify_checksums(path, manifest.get("checksums") or {})
        row_ids_path = path / ROW_IDS_NAME
        self._row_ids = (
            _open_array(row_ids_path, "r", (len(self),), np.dtype(np.int64))
            if row_ids_path.exists()
            else None
        )

    @classmethod
    def create_or_open(
        cls,
        path: str | os.PathLike[str],
        spec: StoreSpec,
        row_ids: np.ndarray | torch.Tensor | Iterable[int] | None = None,
        overwrite: bool = False,
    ) -> "VectorStore":
        """Open the store at ``path`` for writing, creating it if needed.

        Args:
            path: Store directory; created with its parents if missing.
            spec: What the store holds. An existing store is resumed when its identity
                (:meth:`StoreSpec.identity`) and row ids equal the requested ones; the stored
                ``extra`` is kept (change it with :meth:`update_manifest`).
            row_ids: Optional int [num_rows]: original dataset row id of each store row.
            overwrite: Delete any existing store in ``path`` and start from scratch, even one
                that matches. Files in ``path`` that are not part of a store are kept.

        Raises:
            StoreMismatchError: ``path`` holds a store for another setup and ``overwrite`` is
                False.

        Call it from one process only (rank 0); other processes wait until it has returned and
        then call :meth:`open`, because a creating process deletes what it finds.
        """
        path = Path(path)
        ids = _as_row_ids(row_ids, spec.num_rows)
        if (path / MANIFEST_NAME).exists() and not overwrite:
            manifest = _read_manifest(path)
            _check_identity(path, manifest, spec, ids)
            store = cls.open(path, mode="r+")
            if not store._manifest.get("checksums"):  # resumed: rows changed since they were written are redone
                damaged = store.damaged_rows()
                if len(damaged):
                    logger.warning("%s: %d written rows changed on disk since they were written (first: row %d); "
                                   "they are computed again.", path, len(damaged), damaged[0])
                    store._unmark_done(damaged)
            return store
        _create(path, spec, ids)
        return cls.open(path, mode="r+")

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        mode: Literal["r", "r+"] = "r",
        multi_writer: bool = False,
    ) -> "VectorStore":
        """Open an existing store: ``mode="r"`` to read, ``"r+"`` to also write rows.

        Args:
            path: Store directory.
            mode: ``"r"`` or ``"r+"``.
            multi_writer: The store is written by several processes that may run on different
                hosts over a network file system. :meth:`write` then writes rows and done flags
                with positional writes of their exact bytes, each file fsynced, instead of
                through the memory maps (see :meth:`write`). Rows written by other processes
                are guaranteed visible only to a store opened after they were written.

        Raises ``FileNotFoundError`` when ``path`` has no manifest (no store, or its creation
        has not finished) and ``ValueError`` when the files disagree with the manifest.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        return cls(path, _read_manifest(path), mode, multi_writer)

    def check_spec(
        self,
        spec: StoreSpec,
        row_ids: np.ndarray | torch.Tensor | Iterable[int] | None = None,
    ) -> None:
        """Raise :class:`StoreMismatchError` unless this store was made for ``spec`` (its
        identity, :meth:`StoreSpec.identity`) and ``row_ids`` (int [num_rows] or None), the
        check :meth:`create_or_open` makes before it resumes a store."""
        _check_identity(self._path, self._manifest, spec, _as_row_ids(row_ids, spec.num_rows))

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def dim(self) -> int:
        """Length of each stored vector."""
        return int(self._manifest["dim"])

    @property
    def dtype(self) -> np.dtype:
        """On-disk element type (float16, float32 or float64)."""
        return np.dtype(self._manifest["dtype"])

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as this object last read or wrote it (``rows_done`` in it may
        be stale; :attr:`rows_done` is live)."""
        return copy.deepcopy(self._manifest)

    @property
    def spec(self) -> StoreSpec:
        """The store's :class:`StoreSpec`, rebuilt from the manifest (``extra`` included)."""
        fields = ("kind", "model_id", "model_revision", "dataset_fingerprint", "config")
        return StoreSpec(
            **{name: copy.deepcopy(self._manifest[name]) for name in fields},
            num_rows=len(self),
            dim=self.dim,
            dtype=self._manifest["dtype"],
            shard_rows=int(self._manifest["shard_rows"]),
            extra=copy.deepcopy(self._manifest["extra"]),
        )

    @property
    def row_ids(self) -> np.ndarray | None:
        """Read-only int64 [num_rows]: original dataset row id of each store row, or ``None``."""
        return self._row_ids

    @property
    def rows_done(self) -> int:
        """Number of rows written so far, by this or any other process."""
        return int(np.count_nonzero(self._done))

    def __len__(self) -> int:
        """num_rows, written or not."""
        return int(self._manifest["num_rows"])

    def __repr__(self) -> str:
        return (
            f"VectorStore({str(self._path)!r}, kind={self._manifest['kind']!r}, "
            f"rows_done={self.rows_done}/{len(self)}, dim={self.dim}, dtype={self.dtype.name})"
        )

    def is_complete(self) -> bool:
        """Whether every row has been written."""
        return bool(np.all(self._done))

    def pending_rows(self) -> np.ndarray:
        """int64 [k]: ascending store rows not written yet."""
        return np.flatnonzero(np.asarray(self._done) == 0)

    def pending_batches(self, batch_size: int) -> list[tuple[int, int]]:
        """Batches ``[start, end)`` that still have unwritten rows.

        Batch ``b`` is always ``[b * batch_size, min((b + 1) * batch_size, num_rows))``, whatever
        was written before, so a batch recomputed after a crash sees the same inputs (and
        padding) as the first attempt and produces the same bytes. Resume with the same
        ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        num_batches = -(-len(self) // batch_size)
        # Pad with "done" so the flags reshape into one row per batch.
        done = np.ones(num_batches * batch_size, dtype=bool)
        done[: len(self)] = np.asarray(self._done) != 0
        pending = np.flatnonzero(~done.reshape(num_batches, batch_size).all(axis=1))
        return [(int(b) * batch_size, min((int(b) + 1) * batch_size, len(self))) for b in pending]

    def write(self, start: int, rows: np.ndarray | torch.Tensor) -> None:
        """Store ``rows`` as store rows ``[start, start + n)`` and mark them done.

        Args:
            start: First store row.
            rows: Real numbers [n, dim], any float or int dtype (torch tensors on any device,
                bfloat16 included); cast to the store dtype (float16 rounds to nearest).

        The data is flushed to disk before the done flags are set and flushed (with
        ``multi_writer``: written with ``pwrite`` and fsynced, in the same order). Raises
        ``ValueError`` for a wrong shape, rows outside the store, or a NaN/inf value (also one
        produced by overflow when casting to float16), naming the first offending row; nothing
        is written then.
        """
        if self._mode != "r+":
            raise io.UnsupportedOperation(
                f"the store at {self._path} is open read-only; open it with mode='r+' to write"
            )
        if self._manifest.get("checksums"):
            raise io.UnsupportedOperation(
                f"the store at {self._path} is complete and sealed by its checksums; create it again "
                f"({OVERWRITE}) to change its rows"
            )
        array = _as_numpy(rows)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"rows must have shape [n, {self.dim}], got {list(array.shape)}")
        end = start + array.shape[0]
        self._check_range(start, end)
        if start == end:
            return
        # Overflow to inf (float16 max is 65504) is reported by _check_finite, not as a warning.
        with np.errstate(over="ignore"):
            values = array.astype(self.dtype, copy=False)
        self._check_finite(start, array, values)
        self._write_data(start, values)
        self._write_digests(start, values)
        self._mark_done(start, end)

    def update_manifest(self, **extra_fields: Any) -> None:
        """Atomically rewrite ``manifest.json`` with a fresh ``rows_done`` and ``extra_fields``
        merged into its ``"extra"`` dict; a complete store is sealed with the SHA-256 of each of its
        files (``"checksums"``), which every later open verifies. Only the owning process (rank 0)
        should call it, after every writer has finished."""
        if self._mode != "r+":
            raise io.UnsupportedOperation(f"the store at {self._path} is open read-only")
        manifest = copy.deepcopy(self._manifest)
        manifest["rows_done"] = self.rows_done
        if self.is_complete() and not manifest.get("checksums"):
            damaged = self.damaged_rows()
            if len(damaged):
                self._unmark_done(damaged)
                raise CorruptStoreError(
                    f"{self._path}: {len(damaged)} rows changed on disk after they were written (first: row "
                    f"{damaged[0]}); the store is not sealed and those rows are marked unwritten: run again to "
                    f"compute them.")
            names = [_shard_name(index) for index in range(len(self._shards))] + [DONE_NAME]
            names += [ROW_IDS_NAME] if self._row_ids is not None else []
            names += [DIGESTS_NAME] if self._digests is not None else []
            manifest["checksums"] = {name: _file_sha256(self._path / name) for name in names}
        manifest["extra"].update(extra_fields)
        atomic_write_json(self._path / MANIFEST_NAME, manifest)
        self._manifest = manifest

    def read(self, start: int, end: int, require_complete: bool = True) -> np.ndarray:
        """Rows ``[start, end)`` as a new array [end - start, dim] in the store dtype.

        Raises :class:`IncompleteStoreError` if any of these rows is unwritten, unless
        ``require_complete`` is False (unwritten rows then read as zeros).
        """
        self._check_range(start, end)
        if require_complete:
            self._require_written(start, end)
        out = np.empty((end - start, self.dim), dtype=self.dtype)
        for shard, lo, hi, offset in self._pieces(start, end):
            out[offset : offset + hi - lo] = shard[lo:hi]
        return out

    def iter_chunks(
        self, chunk_rows: int, require_complete: bool = True
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows)`` for consecutive chunks of at most ``chunk_rows`` rows, each a
        new array [<= chunk_rows, dim] in the store dtype, so that at most one chunk is in memory.

        With ``require_complete`` the whole store is checked before the first chunk, so a
        consumer never processes half of an incomplete store (:class:`IncompleteStoreError`).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        # Checked here, not in the generator, so the error comes from this call.
        if require_complete:
            self._require_written(0, len(self))

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            for start in range(0, len(self), chunk_rows):
                end = min(start + chunk_rows, len(self))
                yield start, self.read(start, end, require_complete=False)

        return chunks()

    def to_tensor(
        self, dtype: torch.dtype = torch.float32, require_complete: bool = True
    ) -> torch.Tensor:
        """The whole store as a CPU tensor [num_rows, dim] of ``dtype``; loads everything, so
        only for stores that fit in memory (use :meth:`iter_chunks` otherwise)."""
        return torch.from_numpy(self.read(0, len(self), require_complete)).to(dtype)

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= len(self):
            raise ValueError(
                f"rows [{start}, {end}) are outside the store's rows [0, {len(self)})"
            )

    def _require_written(self, start: int, end: int) -> None:
        missing = (end - start) - int(np.count_nonzero(self._done[start:end]))
        if missing:
            raise IncompleteStoreError(
                f"{missing} of the {end - start} requested rows [{start}, {end}) of the store at "
                f"{self._path} have not been written ({len(self) - self.rows_done} of "
                f"{len(self)} rows are missing in total): the extraction stopped early. Resume "
                f"it by running it again with the same output directory, or pass "
                f"require_complete=False to read the missing rows as zeros."
            )

    def _check_finite(self, start: int, original: np.ndarray, values: np.ndarray) -> None:
        bad = ~np.isfinite(values).all(axis=1)
        if not bad.any():
            return
        index = int(np.argmax(bad))
        row = start + index
        where = f"store row {row}"
        if self._row_ids is not None:
            where += f" (dataset row id {int(self._row_ids[row])})"
        if np.isfinite(original[index]).all():
            reason = f"a value outside the {self.dtype.name} range (it would be stored as inf)"
        else:
            reason = "NaN or inf"
        raise ValueError(f"not writing rows [{start}, {start + len(values)}): {where} has {reason}")

    def _pieces(self, start: int, end: int) -> Iterator[tuple[np.memmap, int, int, int]]:
        """Split store rows [start, end) by shard: (shard, lo, hi, offset) means shard rows
        [lo, hi) hold request rows [offset, offset + hi - lo)."""
        shard_rows = int(self._manifest["shard_rows"])
        row = start
        while row < end:
            index, lo = divmod(row, shard_rows)
            hi = min(end - index * shard_rows, shard_rows)
            yield self._shards[index], lo, hi, row - start
            row += hi - lo

    # Why positional writes for several hosts: a memory map writes whole pages back, and on a
    # network file system every host has its own page cache. Two hosts writing different rows of
    # one page (the rows around a boundary between two processes' batches, or neighbouring done
    # flags: one 4 KiB page holds 4096 of them) would each write their whole, partly stale page
    # back, and the later one would erase the other's rows. pwrite sends exactly the bytes
    # written, which NFS, Lustre and GPFS apply byte-exactly. The flags stay in done.npy rather
    # than in per-rank or per-batch marker files, so the store's files and bytes do not depend on
    # how many processes wrote it, a resume with any process count reads one file, and no
    # directory listing (cached for up to a minute on NFS) decides what is done.
    def _write_data(self, start: int, values: np.ndarray) -> None:
        """Copy ``values`` [n, dim] (store dtype) to rows [start, start + n) and flush them."""
        if self._multi_writer:
            row_bytes = self.dim * self.dtype.itemsize
            for shard, lo, hi, offset in self._pieces(start, start + len(values)):
                _write_at(shard.filename, shard.offset + lo * row_bytes, values[offset : offset + hi - lo])
            return
        touched = []
        for shard, lo, hi, offset in self._pieces(start, start + len(values)):
            shard[lo:hi] = values[offset : offset + hi - lo]
            touched.append(shard)
        # msync(MS_SYNC): only dirty pages are written, so flushing a whole shard is cheap.
        for shard in touched:
            shard.flush()

    def damaged_rows(self, chunk_rows: int = 4096) -> np.ndarray:
        """int64 [k]: ascending written rows whose bytes no longer match the digest recorded when they were
        written (none for a store without digests). One read of the written rows."""
        if self._digests is None:
            return np.zeros(0, dtype=np.int64)
        damaged = []
        for start in range(0, len(self), chunk_rows):
            end = min(start + chunk_rows, len(self))
            written = np.flatnonzero(np.asarray(self._done[start:end]) != 0)
            if not len(written):
                continue
            rows = self.read(start, end, require_complete=False)[written]
            changed = np.any(_row_digests(rows) != np.asarray(self._digests[start:end])[written], axis=1)
            damaged.append(start + written[changed])
        return np.concatenate(damaged).astype(np.int64) if damaged else np.zeros(0, dtype=np.int64)

    def _write_digests(self, start: int, values: np.ndarray) -> None:
        """Record (and flush) the digests of rows [start, start + n); after their data, before their flags."""
        if self._digests is None:
            return
        digests = _row_digests(values)
        if self._multi_writer:
            _write_at(self._digests.filename, self._digests.offset + start * DIGEST_BYTES, digests)
            return
        self._digests[start : start + len(values)] = digests
        self._digests.flush()

    def _unmark_done(self, rows: np.ndarray) -> None:
        """Clear (and flush) the done flags of `rows`, so that the next fill computes them again."""
        self._done[rows] = 0
        self._done.flush()
        self._manifest["rows_done"] = self.rows_done

    def _mark_done(self, start: int, end: int) -> None:
        """Set and flush the done flags of rows [start, end); their data must be flushed first."""
        if self._multi_writer:
            _write_at(self._done.filename, self._done.offset + start, np.ones(end - start, np.uint8))
            return
        self._done[start:end] = 1
        self._done.flush()


def _row_digests(rows: np.ndarray) -> np.ndarray:
    """uint8 [n, DIGEST_BYTES]: the first bytes of the SHA-256 of each row's bytes (C order)."""
    rows = np.ascontiguousarray(rows)
    return np.frombuffer(b"".join(hashlib.sha256(row.data).digest()[:DIGEST_BYTES] for row in rows),
                         dtype=np.uint8).reshape(len(rows), DIGEST_BYTES)


def _canonical_json(obj: Any, allow_nan: bool = False) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan
    )


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def _shard_sizes(num_rows: int, shard_rows: int) -> list[int]:
    """Rows in each shard: all ``shard_rows`` but the last."""
    return [min(shard_rows, num_rows - start) for start in range(0, num_rows, shard_rows)]


def _fsync_dir(path: Path) -> None:
    # Makes file creations and renames in the directory durable. Windows cannot open a directory.
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_at(path: str, offset: int, values: np.ndarray) -> None:
    """Write the bytes of ``values`` (C order) into the file at byte ``offset``, then fsync it."""
    data = memoryview(np.ascontiguousarray(values)).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_numpy(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu()
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
        if rows.dtype == torch.bfloat16:
            rows = rows.float()
        rows = rows.numpy()
    array = np.asarray(rows)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"rows must hold real numbers, got dtype {array.dtype}")
    return array


def _as_row_ids(
    row_ids: np.ndarray | torch.Tensor | Iterable[int] | None, num_rows: int
) -> np.ndarray | None:
    if row_ids is None:
        return None
    if isinstance(row_ids, torch.Tensor):
        row_ids = row_ids.detach().cpu().numpy()
    ids = row_ids if isinstance(row_ids, np.ndarray) else np.asarray(list(row_ids))
    if ids.shape != (num_rows,) or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(
            f"row_ids must be integers of shape [{num_rows}], got {ids.dtype} {list(ids.shape)}"
        )
    return ids.astype(np.int64)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"no vector store at {path}: {MANIFEST_NAME} is missing (the store does not exist or "
            f"its creation has not finished; the owning process creates it with "
            f"VectorStore.create_or_open)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptStoreError(
            f"corrupt vector store: {manifest_path} is not valid JSON ({error}); delete the store or pass "
            f"{OVERWRITE}"
        ) from error
    if not isinstance(manifest, dict):
        raise CorruptStoreError(f"corrupt vector store: {manifest_path} does not hold a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this "
            f"version of hf_influence reads format_version {FORMAT_VERSION}"
        )
    return manifest


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _verify_checksums(path: Path, checksums: Mapping[str, str]) -> None:
    """Refuse a sealed store whose files differ from the checksums recorded when it was completed."""
    for name, expected in checksums.items():
        if _file_sha256(path / name) != expected:
            raise CorruptStoreError(
                f"corrupt vector store: {path / name} differs from the SHA-256 recorded when the store was "
                f"completed (bytes flipped or overwritten since); delete the store or pass {OVERWRITE} to "
                f"compute it again"
            )


def _open_array(path: Path, mode: str, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    """Map an existing .npy file, checking it is the array the manifest describes."""
    if not path.exists():
        raise CorruptStoreError(
            f"corrupt vector store: {path} is missing; delete the store or pass {OVERWRITE}"
        )
    # Checked before mapping: numpy extends a short file with zeros when it maps it for writing, which would
    # silently turn rows marked done into zero vectors.
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header_shape, _, header_dtype = read_header(handle)
        needed = handle.tell() + int(np.prod(header_shape)) * np.dtype(header_dtype).itemsize
    size = path.stat().st_size
    if size < needed:
        raise CorruptStoreError(
            f"corrupt vector store: {path} is truncated ({size} bytes, its array needs {needed}); the rows it "
            f"held are lost. Delete the store or pass {OVERWRITE} to compute it again"
        )
    array = open_memmap(path, mode=mode)
    if array.shape != shape or array.dtype != dtype:
        raise CorruptStoreError(
            f"corrupt vector store: {path} holds {array.dtype} {list(array.shape)}, the manifest "
            f"expects {dtype} {list(shape)}; delete the store or pass {OVERWRITE}"
        )
    return array


def _check_identity(
    path: Path, manifest: dict[str, Any], spec: StoreSpec, row_ids: np.ndarray | None
) -> None:
    """Raise StoreMismatchError unless the stored store is the one ``spec`` asks for."""
    requested = spec.identity()
    differences = {
        name: (manifest.get(name), requested[name])
        for name in IDENTITY_FIELDS
        if manifest.get(name) != requested[name]
    }
    detail = ""
    if "config_hash" in differences:
        # Hashes alone do not tell the user what changed; name the differing config keys.
        stored_config = manifest.get("config", {})
        requested_config = json.loads(_canonical_json(spec.config))
        keys = sorted(
            key
            for key in stored_config.keys() | requested_config.keys()
            if stored_config.get(key, "<absent>") != requested_config.get(key, "<absent>")
        )
        detail = "  config keys that differ: " + ", ".join(
            f"{key}: stored {stored_config.get(key, '<absent>')!r}, "
            f"requested {requested_config.get(key, '<absent>')!r}"
            for key in keys
        )
    stored_ids_path = path / ROW_IDS_NAME
    stored_ids = np.load(stored_ids_path, mmap_mode="r") if stored_ids_path.exists() else None
    if (stored_ids is None) != (row_ids is None) or (
        stored_ids is not None and not np.array_equal(stored_ids, row_ids)
    ):
        differences["row_ids"] = (_describe_ids(stored_ids), _describe_ids(row_ids))
    if differences:
        raise StoreMismatchError(path, differences, detail)


def _describe_ids(ids: np.ndarray | None) -> str | None:
    if ids is None:
        return None
    digest = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()
    return f"{len(ids)} ids, first {ids[:3].tolist()}, sha256 {digest[:12]}"


def _remove_store_files(path: Path) -> None:
    """Delete the store files in ``path``, manifest first, so that a crash midway leaves a
    directory that is recognised as incomplete. Other files are left alone."""
    (path / MANIFEST_NAME).unlink(missing_ok=True)
    leftovers = [
        *path.glob(SHARD_GLOB),
        path / DONE_NAME,
        path / ROW_IDS_NAME,
        path / DIGESTS_NAME,
        *path.glob(f".{MANIFEST_NAME}.*.tmp"),
    ]
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)


def _preallocate(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Create a zero-filled .npy file of ``shape`` and reserve its disk blocks."""
    open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    with open(path, "r+b") as handle:
        # Writing through a memory map into an unreserved sparse file kills the process with
        # SIGBUS when the disk fills up; reserving the blocks now fails early with ENOSPC.
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        os.fsync(handle.fileno())


def _create(path: Path, spec: StoreSpec, row_ids: np.ndarray | None) -> None:
    """Build a fresh store in ``path``, replacing any previous one; the manifest comes last."""
    path.mkdir(parents=True, exist_ok=True)
    _remove_store_files(path)
    dtype = np.dtype(spec.dtype)
    for index, rows in enumerate(_shard_sizes(spec.num_rows, spec.shard_rows)):
        _preallocate(path / _shard_name(index), (rows, spec.dim), dtype)
    _preallocate(path / DONE_NAME, (spec.num_rows,), np.dtype(np.uint8))
    _preallocate(path / DIGESTS_NAME, (spec.num_rows, DIGEST_BYTES), np.dtype(np.uint8))
    if row_ids is not None:
        with open(path / ROW_IDS_NAME, "wb") as handle:
            np.save(handle, row_ids)
            handle.flush()
            os.fsync(handle.fileno())
    _fsync_dir(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": spec.kind,
        "model_id": spec.model_id,
        "model_revision": spec.model_revision,
        "dataset_fingerprint": spec.dataset_fingerprint,
        "config": spec.config,
        "config_hash": config_hash(spec.config),
        "num_rows": spec.num_rows,
        "dim": spec.dim,
        "dtype": spec.dtype,
        "shard_rows": spec.shard_rows,
        "rows_done": 0,
        "extra": spec.extra,
    }
    atomic_write_json(path / MANIFEST_NAME, manifest)
