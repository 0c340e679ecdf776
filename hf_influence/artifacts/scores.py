"""Score tables: the full, self-describing output of an influence run.

A score table holds one row per (pool row, target) pair, where a target is a target sample or a target
task, in long format with the columns of `SCHEMA`: the score, plus the pool row's weight and landmark
flag repeated on each of its rows. Its provenance (model, method, config, data fingerprints, library
version) travels with it. On disk it is a folder::

    scores.parquet     the rows, columns and dtypes exactly as SCHEMA
    provenance.json    a JSON object, sorted keys

Loading reads only Parquet and JSON, never pickles, so a score table from anywhere is safe to open.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets.table import InMemoryTable
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor

from .cards import TAGS, card_template
from ..errors import HFInfluenceError
from ..extraction.store import _fsync_dir, atomic_write_bytes

FORMAT_VERSION = 1
SCORES_NAME = "scores.parquet"
PROVENANCE_NAME = "provenance.json"

SCHEMA = datasets.Features(
    {
        "pool_row_id": datasets.Value("int64"),
        "target": datasets.Value("string"),
        "score": datasets.Value("float32"),
        "weight": datasets.Value("float32"),
        "is_landmark": datasets.Value("bool"),
    }
)


class ScoreTableError(HFInfluenceError, ValueError):
    """A score table is malformed, or its inputs or files do not describe one."""


def provenance_record(**fields: Any) -> dict[str, Any]:
    """The given provenance fields plus `hf_influence_version` and `format_version` (always set here).

    Non-finite floats (e.g. an undefined Spearman correlation) become None: strict JSON has no NaN.

    Raises:
        ScoreTableError: a field's value cannot be written as strict JSON (the error names the key).
    """
    # Imported at call time: the package's __init__ may import this module before defining __version__.
    from .. import __version__

    record = json_safe({**fields, "hf_influence_version": __version__, "format_version": FORMAT_VERSION})
    _check_json(record)
    return record


def rows_digest(rows: datasets.Dataset, positions: Sequence[int], columns: Sequence[str] | None = None) -> dict:
    """Content fingerprint of the rows at `positions`, in that order: {"columns": the sorted columns read (default
    all), "sha256": over each row's canonical JSON}. A score table records it for the pool rows it scored, so that
    whoever selects from the table later can tell whether their pool still holds those rows at those ids (a
    dataset's own fingerprint changes with any edit, even one that keeps the rows)."""
    columns = sorted(columns or rows.column_names)
    digest = hashlib.sha256()
    for row in rows.select_columns(columns).select(list(positions)).to_list():
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return {"columns": columns, "sha256": digest.hexdigest()}


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) inside dicts / lists / tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


@dataclass
class ScoreTable:
    """Scores of every pool row for every target, with per-pool-row weights and landmark flags.

    Attributes:
        dataset: long-format rows with the columns of SCHEMA, pool-row-major then in target order
            when built by `from_matrix` (the matrix view does not rely on that order).
        provenance: JSON object describing how the scores were made (see `provenance_record`).
    """

    dataset: datasets.Dataset
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_schema(self.dataset.features.arrow_schema, "ScoreTable.dataset")
        # Every way a table comes into being (load, a Hub pull, a hand-built Dataset) passes here: a NaN score
        # would be silently ranked first or last by every rule.
        table = self._table()
        scores = table.column("score").to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            row = table.slice(int(bad[0]), 1).to_pylist()[0]
            raise ScoreTableError(f"the score table has {len(bad)} non-finite scores; the first, {row['score']}, is "
                                  f"for pool row id {row['pool_row_id']}, target {row['target']!r}.")
        if not isinstance(self.provenance, dict):
            raise ScoreTableError(f"provenance must be a dict, got {type(self.provenance).__name__}.")
        _check_json(self.provenance)

    @classmethod
    def from_matrix(
        cls,
        scores: Tensor,
        pool_row_ids: Sequence[int],
        targets: Sequence[str],
        weights: Tensor | None = None,
        landmark_mask: Tensor | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> ScoreTable:
        """Build a table from a score matrix.

        Args:
            scores: [n, m] score of pool row i for target j; finite, stored as float32.
            pool_row_ids: n distinct ints, the pool row of each matrix row.
            targets: m distinct strings naming the targets (samples or tasks).
            weights: [n] per-pool-row weight, or None (stored as NaN).
            landmark_mask: [n] bool, True for landmark pool rows, or None (all False).
            provenance: JSON-able record; default `provenance_record()`.

        Raises:
            ScoreTableError: naming the argument that is malformed or inconsistent.
        """
        scores = torch.as_tensor(scores).detach()
        if scores.dim() != 2 or 0 in scores.shape:
            raise ScoreTableError(f"scores must be 2-D [n pool rows, m targets], n, m >= 1; got {list(scores.shape)}.")
        n, m = scores.shape
        ids = np.asarray(torch.as_tensor(pool_row_ids).cpu())
        if ids.shape != (n,) or ids.dtype.kind not in "iu":
            raise ScoreTableError(f"pool_row_ids must be {n} ints (one per scores row), got {ids.dtype} {ids.shape}.")
        targets = list(targets)
        if len(targets) != m or not all(isinstance(target, str) for target in targets):
            raise ScoreTableError(f"targets must be {m} strings (one per column of scores), got {len(targets)} items.")
        _check_unique("pool_row_ids", ids)
        _check_unique("targets", targets)
        values = scores.float().cpu().numpy()
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            i, j = bad[0]
            raise ScoreTableError(f"scores has {values[i, j]} for pool row id {ids[i]}, target {targets[j]!r}.")
        weights = np.full(n, np.nan, np.float32) if weights is None else _per_row("weights", weights, n, np.float32)
        landmarks = np.zeros(n, bool) if landmark_mask is None else _per_row("landmark_mask", landmark_mask, n, bool)
        table = pa.table(
            {
                "pool_row_id": np.repeat(ids.astype(np.int64), m),
                # take() repeats the m strings inside Arrow: no Python object per row.
                "target": pc.take(pa.array(targets, pa.string()), pa.array(np.tile(np.arange(m), n))),
                "score": values.reshape(-1),
                "weight": np.repeat(weights, m),
                "is_landmark": np.repeat(landmarks, m),
            },
            schema=SCHEMA.arrow_schema,
        )
        return cls(_as_dataset(table), provenance_record() if provenance is None else provenance)

    def to_matrix(self) -> tuple[Tensor, list[int], list[str]]:
        """The scores as a matrix: (float32 [n, m], n pool row ids, m targets).

        Each score is placed by its (pool_row_id, target), not by its row position. Pool rows and
        targets are ordered by first appearance, so for a table from `from_matrix` or `load` this is
        exactly the matrix, ids and targets it was built from.

        Raises:
            ScoreTableError: some (pool row, target) pair is missing or appears twice.
        """
        table = self._table()
        pool_row_ids, pool_index = _codes(table["pool_row_id"])
        targets, target_index = _codes(table["target"])
        n, m = len(pool_row_ids), len(targets)
        flat = pool_index * m + target_index
        counts = np.bincount(flat, minlength=n * m)
        if (counts != 1).any():
            cell = int(np.argmax(counts != 1))
            problem = "is missing" if counts[cell] == 0 else f"appears {counts[cell]} times"
            raise ScoreTableError(
                f"Score table is not a full matrix: pool row id {pool_row_ids[cell // m]}, target "
                f"{targets[cell % m]!r} {problem}."
            )
        matrix = np.empty(n * m, np.float32)
        matrix[flat] = table["score"].to_numpy()
        return torch.from_numpy(matrix.reshape(n, m)), pool_row_ids.tolist(), targets.tolist()

    @property
    def pool_row_ids(self) -> list[int]:
        """The n pool row ids, in order of first appearance."""
        return pc.unique(self._table()["pool_row_id"]).to_pylist()

    @property
    def targets(self) -> list[str]:
        """The m targets, in order of first appearance."""
        return pc.unique(self._table()["target"]).to_pylist()

    @property
    def weights(self) -> Tensor:
        """float32 [n] weight of each pool row (NaN where none was given), in `pool_row_ids` order."""
        return torch.from_numpy(self._per_pool_row("weight", np.float32))

    @property
    def landmark_mask(self) -> Tensor:
        """bool [n], True for landmark pool rows, in `pool_row_ids` order."""
        return torch.from_numpy(self._per_pool_row("is_landmark", bool))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the table to `directory` (scores.parquet + provenance.json) and return its path.

        The files go to a hidden sibling folder that is renamed into place, so `directory` never holds
        a half-written table. An existing score table (or empty folder) there is replaced.

        Raises:
            ScoreTableError: `directory` exists and is neither a score table nor an empty folder.
        """
        directory = Path(directory)
        if directory.exists() and not is_replaceable_table_folder(directory):
            raise ScoreTableError(
                f"{directory} exists and is not a score table (no {SCORES_NAME} + {PROVENANCE_NAME}); "
                f"refusing to overwrite it."
            )
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        staging.mkdir()
        try:
            pq.write_table(self._table(), staging / SCORES_NAME)
            _fsync_file(staging / SCORES_NAME)
            text = json.dumps(self.provenance, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
            atomic_write_bytes(staging / PROVENANCE_NAME, (text + "\n").encode("utf-8"))
            _move_into_place(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ScoreTable:
        """Read a table written by `save`.

        Raises:
            ScoreTableError: a file is missing or unreadable, the Parquet columns or dtypes differ from
                SCHEMA, or provenance.json is not a JSON object; the message names the file.
        """
        directory = Path(directory)
        scores_path, provenance_path = directory / SCORES_NAME, directory / PROVENANCE_NAME
        for path in (scores_path, provenance_path):
            if not path.is_file():
                raise ScoreTableError(f"{directory} is not a score table: {path.name} is missing.")
        try:
            table = pq.read_table(scores_path)
        except (OSError, pa.ArrowException) as error:
            raise ScoreTableError(f"Cannot read {scores_path}: {error}") from error
        _check_schema(table.schema, str(scores_path))
        try:
            provenance = json.loads(provenance_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ScoreTableError(f"{provenance_path} is not valid JSON: {error}") from error
        if not isinstance(provenance, dict):
            raise ScoreTableError(f"{provenance_path} must hold a JSON object, got a {type(provenance).__name__}.")
        return cls(_as_dataset(table), provenance)

    def push_to_hub(self, repo_id: str, config_name: str = "default", private: bool | None = None,
                    token: str | None = None, pretty_name: str | None = None, license: str | None = None,
                    source_datasets: list[str] | None = None) -> str:
        """Push this table as config `config_name` of the dataset repo `repo_id`, with its provenance and card
        (`hub.push_score_table`: `license` and `source_datasets` go on the card). Returns the repo URL."""
        return push_score_table(self, repo_id, config_name=config_name, private=private, token=token,
                                pretty_name=pretty_name, license=license, source_datasets=source_datasets)

    @classmethod
    def from_pretrained(cls, repo_id_or_folder: str | os.PathLike[str], config_name: str = "default",
                        revision: str | None = None, token: str | None = None) -> ScoreTable:
        """A table from a folder written by `save`, or config `config_name` of a Hub dataset repo pushed by
        `push_to_hub` (`hub.load_score_table`)."""
        if Path(repo_id_or_folder).is_dir():
            return cls.load(repo_id_or_folder)
        return load_score_table(str(repo_id_or_folder), config_name=config_name, revision=revision, token=token)

    def __len__(self) -> int:
        """Number of (pool row, target) scores: n * m for a full table."""
        return len(self.dataset)

    def __repr__(self) -> str:
        method = self.provenance.get("method")
        return f"ScoreTable({len(self)} scores{f', method={method!r}' if method else ''})"

    def _table(self) -> pa.Table:
        # Applies any indices mapping (select, shuffle) the dataset carries.
        table = self.dataset.with_format("arrow")[:]
        for name in SCHEMA:
            if table[name].null_count:
                raise ScoreTableError(f"Score table column {name!r} has {table[name].null_count} missing values.")
        return table

    def _per_pool_row(self, column: str, dtype: type) -> np.ndarray:
        table = self._table()
        _, pool_index = _codes(table["pool_row_id"])
        values = table[column].to_numpy(zero_copy_only=False).astype(dtype)
        result = np.empty(pool_index.max() + 1, dtype)
        result[pool_index] = values
        if not np.array_equal(result[pool_index], values, equal_nan=True):
            raise ScoreTableError(f"Column {column!r} differs between rows of one pool row: it must be per pool row.")
        return result


def _as_dataset(table: pa.Table) -> datasets.Dataset:
    # An explicit content fingerprint: without one, datasets hashes the table by pickling all of it.
    digest = hashlib.sha256()
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
    info = datasets.DatasetInfo(features=SCHEMA)
    return datasets.Dataset(InMemoryTable(table), info=info, fingerprint=digest.hexdigest()[:16])


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values in order of first appearance, index of each row's value among them)."""
    values = pc.unique(column)
    # int64 codes: pool_index * m would overflow Arrow's int32 indices beyond 2**31 scores.
    return values.to_numpy(zero_copy_only=False), pc.index_in(column, value_set=values).to_numpy().astype(np.int64)


def _check_schema(schema: pa.Schema, where: str) -> None:
    # Compares Arrow types, not the `huggingface` metadata a Parquet file may carry: that can disagree.
    for name, expected in SCHEMA.items():
        if name not in schema.names:
            raise ScoreTableError(f"{where}: column {name!r} is missing; a score table has columns {list(SCHEMA)}.")
        if schema.field(name).type != expected.pa_type:
            raise ScoreTableError(
                f"{where}: column {name!r} has Arrow type {schema.field(name).type}, expected {expected.dtype}."
            )
    extra = [name for name in schema.names if name not in SCHEMA]
    if extra:
        raise ScoreTableError(f"{where}: unexpected columns {extra}; a score table has columns {list(SCHEMA)}.")


def _check_json(record: dict[str, Any]) -> None:
    for key, value in record.items():
        if not isinstance(key, str):
            raise ScoreTableError(f"Provenance keys must be strings, got {key!r}.")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ScoreTableError(f"Provenance field {key!r} is not JSON-serialisable: {error}") from error


def _check_unique(name: str, values: np.ndarray | list) -> None:
    distinct, counts = np.unique(np.asarray(values), return_counts=True)
    if (counts > 1).any():
        repeated = distinct[np.argmax(counts > 1)].item()
        raise ScoreTableError(f"{name} must be unique; {repeated!r} appears more than once.")


def _per_row(name: str, values: Tensor, n: int, dtype: type) -> np.ndarray:
    array = np.asarray(torch.as_tensor(values).detach().cpu())
    if array.shape != (n,):
        raise ScoreTableError(f"{name} must have shape ({n},), one entry per pool row; got {array.shape}.")
    return array.astype(dtype)


def is_replaceable_table_folder(directory: Path) -> bool:
    """Whether `ScoreTable.save` may write into the existing `directory`: empty, or holding exactly a table's files."""
    if not directory.is_dir():
        return False
    names = {path.name for path in directory.iterdir()}
    return not names or names == {SCORES_NAME, PROVENANCE_NAME}


def _move_into_place(staging: Path, directory: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old table aside first. A crash
    # between the two renames leaves the old and new tables complete under their hidden names.
    old = staging.with_suffix(".old")
    if directory.exists():
        os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        if old.exists():
            os.rename(old, directory)
        raise
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _provenance_path(config_name: str) -> str:
    return f"provenance/{config_name}.json"


def _config_summary(name: str, provenance: dict) -> dict:
    landmarks = provenance.get("details", {}).get("num_landmarks")
    return {
        "name": name,
        "method": provenance.get("method"),
        "selection": provenance.get("selection"),
        "model_id": provenance.get("model_id"),
        # A Hub id links to its page; a local folder or an in-memory model's class name does not.
        "model_url": (f"https://huggingface.co/{provenance['model_id']}" if re.fullmatch(
            r"[\w.-]+/[\w.-]+", str(provenance.get("model_id") or "")) and not Path(provenance["model_id"]).exists()
            else None),
        "model_revision": provenance.get("model_revision"),
        "pool_rows": provenance.get("pool_rows", "?"),
        "targets": provenance.get("target_count", "?"),
        "budget": provenance.get("budget"),
        "landmarks": "all (exact)" if landmarks is None else landmarks,
        "pool_fingerprint": provenance.get("pool_fingerprint"),
        "target_fingerprint": provenance.get("target_fingerprint"),
        "hf_influence_version": provenance.get("hf_influence_version"),
    }


def push_score_table(table: ScoreTable, repo_id: str, config_name: str = "default", private: bool | None = None,
                     token: str | None = None, pretty_name: str | None = None, license: str | None = None,
                     source_datasets: list[str] | None = None) -> str:
    """Push `table` as config `config_name` of the dataset repo `repo_id` (created if needed).

    Writes the rows (parquet, via `Dataset.push_to_hub`), `provenance/{config_name}.json`, and the dataset
    card (every config of the repo summarised, with usage, links to each config's model on the Hub).

    Args:
        license: the card's licence. Scores derive from the pool, the targets and the model, so it is the
            user's call; None keeps what the card had (nothing, on a new repo).
        source_datasets: Hub ids of the pool and target datasets, added to the card's `source_datasets` (the
            provenance only records their fingerprints).

    Returns:
        The URL of the repo.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    provenance = {**table.provenance, "pool_rows": len(table.pool_row_ids), "target_count": len(table.targets)}
    table.dataset.push_to_hub(repo_id, config_name=config_name, split="train", token=token,
                              commit_message=f"Score table {config_name}")
    api.upload_file(path_or_fileobj=json.dumps(provenance, indent=2, sort_keys=True).encode(),
                    path_in_repo=_provenance_path(config_name), repo_id=repo_id, repo_type="dataset",
                    commit_message=f"Provenance of {config_name}")
    # push_to_hub wrote the configs / dataset_info metadata into README.md: keep it, add ours.
    metadata = DatasetCard.load(repo_id, repo_type="dataset", token=token).data.to_dict()
    metadata["tags"] = sorted(set(metadata.get("tags") or []) | set(TAGS))
    metadata["pretty_name"] = pretty_name or metadata.get("pretty_name") or repo_id.split("/")[-1]
    if license is not None:
        metadata["license"] = license
    if source_datasets:
        metadata["source_datasets"] = sorted(set(metadata.get("source_datasets") or []) | set(source_datasets))
    names = [entry["config_name"] for entry in metadata.get("configs", [])] or [config_name]
    summaries = [_config_summary(name, provenance if name == config_name
                                 else _remote_provenance(repo_id, name, token=token) or {}) for name in names]
    card = DatasetCard.from_template(
        DatasetCardData(**metadata), template_str=card_template("score_table.md"), repo_id=repo_id,
        pretty_name=metadata["pretty_name"], configs=summaries, example_config=config_name,
    )
    card.push_to_hub(repo_id, repo_type="dataset", token=token, commit_message="Update the score table card")
    return f"{api.endpoint}/datasets/{repo_id}"


def _remote_provenance(repo_id: str, config_name: str, revision: str | None = None,
                       token: str | None = None) -> dict | None:
    try:
        path = hf_hub_download(repo_id, _provenance_path(config_name), repo_type="dataset", revision=revision,
                               token=token)
    except EntryNotFoundError:
        return None
    with open(path) as handle:
        return json.load(handle)


def load_score_table(repo_id: str, config_name: str = "default", revision: str | None = None,
                     token: str | None = None) -> ScoreTable:
    """Load config `config_name` of a score-table dataset repo pushed by `push_score_table`.

    Raises:
        ScoreTableError: the repo has no provenance for that config, or its rows do not have the score-table
            schema (the message names the repo and config).
    """
    provenance = _remote_provenance(repo_id, config_name, revision=revision, token=token)
    if provenance is None:
        raise ScoreTableError(f"{repo_id} has no {_provenance_path(config_name)}: it is not a score table pushed by "
                              f"hf-influence, or it has no config {config_name!r}.")
    dataset = datasets.load_dataset(repo_id, config_name, split="train", revision=revision, token=token)
    try:
        return ScoreTable(dataset, provenance)
    except ScoreTableError as error:
        raise ScoreTableError(f"{repo_id} config {config_name!r} is not a score table: {error}") from error
