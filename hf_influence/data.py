"""Read pool and target rows from local files or the Hub into a `datasets.Dataset`."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from datasets import Dataset, load_dataset

from .errors import HFInfluenceError

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataFileError(HFInfluenceError, ValueError):
    """A data file that cannot be read as rows; the message names the file (and the line, for JSON Lines)."""


def load_rows(source: str | os.PathLike | Dataset, split: str = "train", limit: int | None = None) -> Dataset:
    """Load rows from a jsonl / json / parquet / csv file (optionally .gz), a folder of them, or a Hub id.

    Args:
        source: a path, a Hub dataset id (`owner/name`, optionally `owner/name:config`), or a Dataset
            (returned as is, truncated to `limit`).
        split: split to read from a Hub dataset.
        limit: keep only the first `limit` rows.

    Raises:
        FileNotFoundError: a path-like source that does not exist (naming it).
        ValueError: an unsupported file extension.
        DataFileError: a file the reader fails on, named with the first malformed line of a JSON Lines file.
    """
    if isinstance(source, Dataset):
        dataset = source
    else:
        path = Path(source)
        if path.exists():
            files = sorted(p for p in path.iterdir() if _builder(p)) if path.is_dir() else [path]
            if not files:
                raise ValueError(f"{path} holds no .jsonl/.json/.parquet/.csv file.")
            builder = _builder(files[0])
            if builder is None:
                raise ValueError(f"Unsupported file {path}: use .jsonl, .json, .parquet or .csv (optionally .gz).")
            try:
                dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train")
            except Exception as error:  # the builders' errors bury the file and row in a generic message
                raise DataFileError(_first_bad_line(files) or f"Cannot read {', '.join(map(str, files))} as "
                                    f"{builder} rows: {error}") from error
        elif str(source).startswith((".", "/", "~")) or Path(str(source)).suffix in _LOCAL_BUILDERS or str(source).endswith(".gz"):
            raise FileNotFoundError(f"No such data file: {source}")
        else:
            name, _, config = str(source).partition(":")
            dataset = load_dataset(name, config or None, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def sample_rows(rows: Dataset, count: int | None, seed: int = 0) -> Dataset:
    """A seeded random sample of `count` rows (all rows, in order, when count is None or >= len(rows))."""
    return rows if count is None or count >= len(rows) else rows.shuffle(seed=seed).select(range(count))


def _first_bad_line(files: list[Path]) -> str | None:
    """"FILE, line N: ..." for the first line of a JSON Lines file that is not one JSON object, or "FILE is empty";
    None if every line is a row."""
    for path in files:
        if ".jsonl" not in path.suffixes:
            continue
        rows = 0
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                rows += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    return f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno}): {line[:80]!r}"
                if not isinstance(row, dict):
                    return f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}"
        if rows == 0:
            return f"{path} is empty: it holds no rows"
    return None


def _builder(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return _LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None
