"""Tests for hf_influence.extraction.store: layout, resume after crashes, identity checks, atomic writes.

Run as a script (``python tests/test_store.py MODE PATH ...``) this file is the writer process
that the crash and multi-process tests start and kill.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_influence.extraction.store import (
    CorruptStoreError,
    IncompleteStoreError,
    StoreMismatchError,
    StoreSpec,
    VectorStore,
    atomic_write_json,
    config_hash,
    fingerprint_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_ROWS = 30
DIM = 5
# 7 rows per shard and batches of 4: batches [4, 8), [12, 16), ... straddle shard boundaries.
SHARD_ROWS = 7
BATCH = 4
ROW_IDS = 100 + 10 * np.arange(NUM_ROWS)


def make_spec(**overrides) -> StoreSpec:
    fields = dict(
        kind="gradients",
        model_id="tiny/model",
        model_revision="abc123",
        dataset_fingerprint="fp0",
        config={"proj_dim": DIM, "seed": 0},
        num_rows=NUM_ROWS,
        dim=DIM,
        dtype="float32",
        shard_rows=SHARD_ROWS,
    )
    fields.update(overrides)
    return StoreSpec(**fields)


def make_rows(start: int, end: int, dim: int = DIM) -> np.ndarray:
    """float32 [end - start, dim]; a pure function of the row index, like a deterministic
    extraction, with distinct values in every row and column."""
    index = np.arange(start, end, dtype=np.float64)[:, None]
    return (np.sin(index * 1.7 + np.arange(dim) * 0.3) * (index + 1)).astype(np.float32)


def fill(store: VectorStore, batch_size: int = BATCH) -> None:
    """Write every pending batch, as an extraction loop does."""
    for start, end in store.pending_batches(batch_size):
        store.write(start, make_rows(start, end, store.dim))


def build_reference(path: Path, spec: StoreSpec, row_ids=ROW_IDS) -> None:
    """A store written in one go, without interruption."""
    store = VectorStore.create_or_open(path, spec, row_ids=row_ids)
    fill(store)
    store.update_manifest()


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


# The writer processes load extraction/store.py and the two modules it imports (errors.py, verbosity.py) from
# their files, without the package's __init__ (which would import torch-heavy modules and take seconds per
# writer). Then they run this file as a script.
_WRITER_BOOTSTRAP = """
import importlib.util, pathlib, runpy, sys
package = pathlib.Path(sys.argv[1])
for name in ("errors", "verbosity", "extraction.store"):
    path = package.joinpath(*name.split(".")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location("hf_influence." + name, path)
    sys.modules["hf_influence." + name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_writer(*args: str) -> subprocess.Popen:
    """Start this file as a writer process (see _writer_main) with ``args``."""
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER_BOOTSTRAP, str(REPO_ROOT / "hf_influence"), __file__, *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_roundtrip_across_shard_boundaries(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)
    store.write(0, make_rows(0, 3))
    store.write(3, make_rows(3, 20))  # spans shards 0, 1 and 2
    store.write(20, torch.from_numpy(make_rows(20, NUM_ROWS)))

    expected = make_rows(0, NUM_ROWS)
    assert store.is_complete() and store.rows_done == NUM_ROWS
    np.testing.assert_array_equal(store.read(0, NUM_ROWS), expected)
    np.testing.assert_array_equal(store.read(5, 16), expected[5:16])
    chunks = list(store.iter_chunks(11))
    assert [start for start, _ in chunks] == [0, 11, 22]
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in chunks]), expected)
    assert torch.equal(store.to_tensor(), torch.from_numpy(expected))
    assert (len(store), store.dim, store.dtype) == (NUM_ROWS, DIM, np.dtype("float32"))
    np.testing.assert_array_equal(store.row_ids, ROW_IDS)

    # The files are the documented layout: contiguous rows, last shard shorter.
    shards = sorted((tmp_path / "s").glob("shard-*.npy"))
    assert [p.name for p in shards] == [f"shard-{i:05d}.npy" for i in range(5)]
    for index, shard_path in enumerate(shards):
        shard = np.load(shard_path)
        start = index * SHARD_ROWS
        np.testing.assert_array_equal(shard, expected[start : start + SHARD_ROWS])
    assert np.load(shards[-1]).shape == (2, DIM)
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "done.npy"), np.ones(NUM_ROWS))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["config_hash"] == config_hash({"seed": 0, "proj_dim": DIM})
    assert manifest["format_version"] == 1 and manifest["rows_done"] == 0


def test_float16_storage(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(dtype="float16"))
    rows = make_rows(0, NUM_ROWS)
    store.write(0, torch.from_numpy(rows))

    assert np.load(tmp_path / "s" / "shard-00000.npy").dtype == np.float16
    out = store.read(0, NUM_ROWS)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, rows.astype(np.float16))
    assert store.to_tensor().dtype == torch.float32
    assert torch.equal(store.to_tensor(), torch.from_numpy(rows.astype(np.float16)).float())


def test_bfloat16_tensor_input(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    rows = torch.from_numpy(make_rows(0, BATCH)).to(torch.bfloat16)
    store.write(0, rows)
    assert torch.equal(torch.from_numpy(store.read(0, BATCH)), rows.float())


def test_pending_batches_after_partial_writes(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(num_rows=14))
    assert store.pending_batches(BATCH) == [(0, 4), (4, 8), (8, 12), (12, 14)]
    store.write(4, make_rows(4, 8))
    store.write(8, make_rows(8, 11))  # batch [8, 12) only partly written
    store.write(12, make_rows(12, 14))

    assert store.pending_batches(BATCH) == [(0, 4), (8, 12)]
    np.testing.assert_array_equal(store.pending_rows(), [0, 1, 2, 3, 11])
    assert store.rows_done == 9 and not store.is_complete()
    # Boundaries are fixed by index, not by what is left: batch size 5 -> [0,5), [10,14).
    assert store.pending_batches(5) == [(0, 5), (10, 14)]
    with pytest.raises(ValueError):
        store.pending_batches(0)


def test_resume_after_crash_is_byte_identical(tmp_path):
    build_reference(tmp_path / "ref", make_spec())

    store = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)
    for start, end in store.pending_batches(BATCH)[:3]:
        store.write(start, make_rows(start, end))
    del store  # the "crash": nothing is closed or finalised

    store = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)
    assert store.rows_done == 12
    assert store.pending_batches(BATCH)[0] == (12, 16)
    fill(store)
    store.update_manifest()

    assert dir_bytes(tmp_path / "s") == dir_bytes(tmp_path / "ref")


def test_crash_between_data_flush_and_done_flag_recomputes_rows(tmp_path, monkeypatch):
    build_reference(tmp_path / "ref", make_spec())
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)
    store.write(0, make_rows(0, 8))

    def crash(self, start, end):
        raise KeyboardInterrupt("killed after the data flush, before the done flags")

    monkeypatch.setattr(VectorStore, "_mark_done", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write(8, make_rows(8, 12))
    monkeypatch.undo()
    del store

    store = VectorStore.open(tmp_path / "s", mode="r+")
    # The data reached the shard, but without its flags the batch counts as not written.
    np.testing.assert_array_equal(store.read(8, 12, require_complete=False), make_rows(8, 12))
    assert store.pending_batches(BATCH)[0] == (8, 12)
    fill(store)
    store.update_manifest()
    assert dir_bytes(tmp_path / "s") == dir_bytes(tmp_path / "ref")


def test_data_is_flushed_before_done_flags_are_set(tmp_path, monkeypatch):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    flushes = []
    original_flush = np.memmap.flush

    def recording_flush(self):
        # Which file is flushed, and how many rows were flagged done at that moment.
        flushes.append((Path(self.filename).name, store.rows_done))
        original_flush(self)

    monkeypatch.setattr(np.memmap, "flush", recording_flush)
    store.write(5, make_rows(5, 9))  # rows in shards 0 and 1
    assert flushes == [("shard-00000.npy", 0), ("shard-00001.npy", 0), ("row_digests.npy", 0), ("done.npy", 4)]


@pytest.mark.slow
def test_resume_after_kill_9_is_byte_identical(tmp_path):
    spec = make_spec(num_rows=2000, dim=64, shard_rows=128, config={"big": True})
    build_reference(tmp_path / "ref", spec, row_ids=None)

    writer = start_writer("kill-me", str(tmp_path / "s"))
    reported = [int(writer.stdout.readline()) for _ in range(3)]
    writer.kill()  # SIGKILL: no cleanup, no finally blocks, no flushes
    writer.communicate()
    assert writer.returncode == -9 and reported == [0, 8, 16]

    store = VectorStore.create_or_open(tmp_path / "s", spec)
    assert not store.is_complete(), "the writer finished before it was killed"
    assert store.rows_done >= 24
    fill(store, batch_size=8)
    store.update_manifest()
    assert dir_bytes(tmp_path / "s") == dir_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_two_processes_write_disjoint_rows(tmp_path):
    build_reference(tmp_path / "ref", make_spec())
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)  # rank 0

    writers = [start_writer("rank", str(tmp_path / "s"), str(rank), "2") for rank in range(2)]
    for writer in writers:
        writer.communicate(timeout=120)
        assert writer.returncode == 0

    assert store.is_complete()  # rank 0's maps see the other processes' rows
    store.update_manifest()
    assert dir_bytes(tmp_path / "s") == dir_bytes(tmp_path / "ref")


MISMATCHES = [
    ("kind", {"kind": "jvp_embeddings"}, "'gradients'", "'jvp_embeddings'"),
    ("model_id", {"model_id": "other/model"}, "'tiny/model'", "'other/model'"),
    ("model_revision", {"model_revision": None}, "'abc123'", "None"),
    ("dataset_fingerprint", {"dataset_fingerprint": "fp1"}, "'fp0'", "'fp1'"),
    ("config_hash", {"config": {"proj_dim": DIM, "seed": 1}}, "seed: stored 0", "requested 1"),
    ("num_rows", {"num_rows": 31}, "stored 30", "requested 31"),
    ("dim", {"dim": 6}, "stored 5", "requested 6"),
    ("dtype", {"dtype": "float16"}, "'float32'", "'float16'"),
    ("shard_rows", {"shard_rows": 8}, "stored 7", "requested 8"),
]


@pytest.mark.parametrize(
    "field,overrides,stored,requested", MISMATCHES, ids=[m[0] for m in MISMATCHES]
)
def test_mismatch_names_field_and_overwrite_recreates(
    tmp_path, field, overrides, stored, requested
):
    path = tmp_path / "s"
    VectorStore.create_or_open(path, make_spec()).write(0, make_rows(0, BATCH))
    (path / "notes.txt").write_text("not part of the store")
    new_spec = make_spec(**overrides)

    with pytest.raises(StoreMismatchError) as caught:
        VectorStore.create_or_open(path, new_spec)
    assert set(caught.value.differences) == {field}
    message = str(caught.value)
    assert f"{field}: stored" in message and stored in message and requested in message
    assert "overwrite=True" in message and "new output directory" in message
    assert VectorStore.open(path).rows_done == BATCH  # the refused store is untouched

    store = VectorStore.create_or_open(path, new_spec, overwrite=True)
    assert store.rows_done == 0
    assert store.spec.identity() == new_spec.identity()
    num_shards = -(-new_spec.num_rows // new_spec.shard_rows)
    expected_files = {f"shard-{i:05d}.npy" for i in range(num_shards)}
    expected_files |= {"manifest.json", "done.npy", "row_digests.npy", "notes.txt"}
    assert {p.name for p in path.iterdir()} == expected_files
    # The new store works end to end.
    store.write(0, make_rows(0, new_spec.num_rows, new_spec.dim))
    assert store.is_complete()


def test_row_ids_mismatch(tmp_path):
    VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)
    for requested in (ROW_IDS + 1, None):
        with pytest.raises(StoreMismatchError) as caught:
            VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=requested)
        assert set(caught.value.differences) == {"row_ids"}
    assert VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=list(ROW_IDS))


def test_overwrite_restarts_even_a_matching_store(tmp_path):
    VectorStore.create_or_open(tmp_path / "s", make_spec()).write(0, make_rows(0, BATCH))
    assert VectorStore.create_or_open(tmp_path / "s", make_spec()).rows_done == BATCH
    assert VectorStore.create_or_open(tmp_path / "s", make_spec(), overwrite=True).rows_done == 0


def test_crash_during_creation_leaves_no_manifest(tmp_path, monkeypatch):
    store_module = sys.modules[VectorStore.__module__]
    original = store_module._preallocate

    def crash_on_done(path, shape, dtype):
        if path.name == "done.npy":
            raise KeyboardInterrupt("killed while creating the store")
        original(path, shape, dtype)

    # An old store is being replaced: its manifest must not outlive its files.
    VectorStore.create_or_open(tmp_path / "s", make_spec(dim=3)).write(0, make_rows(0, 4, 3))
    monkeypatch.setattr(store_module, "_preallocate", crash_on_done)
    with pytest.raises(KeyboardInterrupt):
        VectorStore.create_or_open(tmp_path / "s", make_spec(), overwrite=True)
    monkeypatch.undo()

    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError):
        VectorStore.open(tmp_path / "s")
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    assert store.rows_done == 0 and len(store.pending_batches(BATCH)) == 8


def test_directory_without_manifest_is_recreated(tmp_path):
    path = tmp_path / "s"
    VectorStore.create_or_open(path, make_spec(), row_ids=ROW_IDS).write(0, make_rows(0, 12))
    (path / "manifest.json").unlink()  # as if creation had crashed before its last step
    (path / ".manifest.json.123.abcd.tmp").write_text("{")  # a torn temporary file
    (path / "notes.txt").write_text("not part of the store")
    with pytest.raises(FileNotFoundError, match="create_or_open"):
        VectorStore.open(path)

    store = VectorStore.create_or_open(path, make_spec(shard_rows=10))
    assert store.rows_done == 0
    np.testing.assert_array_equal(store.read(0, NUM_ROWS, require_complete=False), 0)
    assert store.row_ids is None
    shards = {"shard-00000.npy", "shard-00001.npy", "shard-00002.npy"}
    assert {p.name for p in path.iterdir()} == shards | {"done.npy", "row_digests.npy", "manifest.json", "notes.txt"}


@pytest.mark.parametrize(
    "bad,dtype,reason",
    [
        (np.nan, "float32", "NaN or inf"),
        (np.inf, "float32", "NaN or inf"),
        (-np.inf, "float64", "NaN or inf"),
        (1e6, "float16", "outside the float16 range"),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_finite_rows_are_rejected_naming_the_row(tmp_path, bad, dtype, reason, as_tensor):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(dtype=dtype), row_ids=ROW_IDS)
    rows = make_rows(8, 12)
    rows[2, 3] = bad
    rows[3, 0] = bad  # a later bad row must not be the one reported
    with pytest.raises(ValueError, match=reason) as caught:
        store.write(8, torch.from_numpy(rows) if as_tensor else rows)
    assert "store row 10 (dataset row id 200)" in str(caught.value)
    assert store.rows_done == 0
    np.testing.assert_array_equal(store.read(8, 12, require_complete=False), 0)


def test_non_finite_message_without_row_ids(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    rows = make_rows(0, 2)
    rows[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"store row 1 has NaN"):
        store.write(0, rows)


def test_write_validates_shape_range_and_mode(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    for start, rows in [
        (0, make_rows(0, 2, dim=DIM + 1)),
        (0, make_rows(0, 1)[0]),
        (NUM_ROWS - 1, make_rows(0, 2)),
        (-1, make_rows(0, 1)),
    ]:
        with pytest.raises(ValueError):
            store.write(start, rows)
    assert store.rows_done == 0
    with pytest.raises(io.UnsupportedOperation):
        VectorStore.open(tmp_path / "s").write(0, make_rows(0, 1))
    with pytest.raises(ValueError, match="dtype"):
        make_spec(dtype="bfloat16")


def test_incomplete_read_raises(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    store.write(0, make_rows(0, 12))

    with pytest.raises(IncompleteStoreError, match=r"18 of the 30 requested rows") as caught:
        store.read(0, NUM_ROWS)
    assert "Resume" in str(caught.value)
    with pytest.raises(IncompleteStoreError, match="18 of 30 rows are missing"):
        store.iter_chunks(10)  # raised by the call, before any chunk is consumed
    with pytest.raises(IncompleteStoreError):
        store.to_tensor()
    with pytest.raises(IncompleteStoreError, match="1 of the 2 requested"):
        store.read(11, 13)

    np.testing.assert_array_equal(store.read(0, 12), make_rows(0, 12))
    partial = store.read(0, NUM_ROWS, require_complete=False)
    np.testing.assert_array_equal(partial[12:], 0)
    assert sum(len(rows) for _, rows in store.iter_chunks(10, require_complete=False)) == NUM_ROWS


def test_update_manifest_and_spec_roundtrip(tmp_path):
    spec = make_spec(extra={"torch": "2.13"})
    store = VectorStore.create_or_open(tmp_path / "s", spec)
    store.write(0, make_rows(0, 6))
    store.update_manifest(seconds=1.5)

    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk["rows_done"] == 6
    assert on_disk["extra"] == {"torch": "2.13", "seconds": 1.5}
    assert VectorStore.open(tmp_path / "s").manifest == on_disk
    assert store.spec == make_spec(extra={"torch": "2.13", "seconds": 1.5})
    with pytest.raises(ValueError):  # NaN is not JSON; the manifest must stay valid
        store.update_manifest(seconds=float("nan"))
    assert json.loads((tmp_path / "s" / "manifest.json").read_text()) == on_disk


def test_open_detects_damaged_store(tmp_path):
    with pytest.raises(FileNotFoundError):
        VectorStore.open(tmp_path / "nothing")
    VectorStore.create_or_open(tmp_path / "s", make_spec())
    (tmp_path / "s" / "shard-00004.npy").unlink()
    with pytest.raises(ValueError, match="shard-00004.npy is missing"):
        VectorStore.open(tmp_path / "s")
    np.save(tmp_path / "s" / "shard-00004.npy", np.zeros((3, DIM), np.float32))
    with pytest.raises(ValueError, match=r"expects float32 \[2, 5\]"):
        VectorStore.create_or_open(tmp_path / "s", make_spec())


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_a_truncated_shard_is_refused_not_zero_filled(tmp_path, mode):
    """A shard cut short (a full disk, a copy interrupted) is refused on open, naming the file, in either mode;
    numpy would otherwise extend it with zeros when mapping it for writing, and the rows marked done in it would
    silently become zero vectors."""
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    store.write(0, make_rows(0, NUM_ROWS))
    del store
    shard = tmp_path / "s" / "shard-00001.npy"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - 3 * DIM)
    with pytest.raises(ValueError, match=r"shard-00001.npy is truncated .*overwrite=True"):
        VectorStore.open(tmp_path / "s", mode=mode)
    assert shard.stat().st_size == size - 3 * DIM  # the refusal changed nothing
    with pytest.raises(ValueError, match="truncated"):
        VectorStore.create_or_open(tmp_path / "s", make_spec())
    again = VectorStore.create_or_open(tmp_path / "s", make_spec(), overwrite=True)
    assert again.rows_done == 0


def test_a_sealed_store_refuses_flipped_bytes_and_a_corrupt_manifest_naming_the_file(tmp_path):
    """A complete store's update_manifest records each file's SHA-256; a byte flipped later inside a shard (same
    size, so the truncation check cannot see it) is refused on open, and a sealed store takes no more writes."""
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    store.write(0, make_rows(0, NUM_ROWS - 1))
    store.update_manifest()
    assert "checksums" not in store.manifest  # not complete yet: nothing to seal
    store.write(NUM_ROWS - 1, make_rows(NUM_ROWS - 1, NUM_ROWS))
    store.update_manifest()
    assert set(store.manifest["checksums"]) >= {"shard-00000.npy", "shard-00001.npy", "done.npy"}
    with pytest.raises(io.UnsupportedOperation, match="sealed"):
        store.write(0, make_rows(0, 1))
    del store
    np.testing.assert_array_equal(VectorStore.open(tmp_path / "s").read(0, NUM_ROWS), make_rows(0, NUM_ROWS))

    shard = tmp_path / "s" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    for open_store in (lambda: VectorStore.open(tmp_path / "s"),
                       lambda: VectorStore.create_or_open(tmp_path / "s", make_spec())):
        with pytest.raises(CorruptStoreError, match=r"shard-00001.npy differs from the SHA-256 .*overwrite=True"):
            open_store()
    assert VectorStore.create_or_open(tmp_path / "s", make_spec(), overwrite=True).rows_done == 0

    (tmp_path / "s" / "manifest.json").write_text('{"format_version": 1, "kind"')
    with pytest.raises(CorruptStoreError, match=r"s/manifest.json is not valid JSON"):
        VectorStore.open(tmp_path / "s")


def test_atomic_write_json_failures_keep_old_content(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"a": 1})
    old = target.read_bytes()

    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"a": float("inf")})

    def failing_replace(src, dst):
        raise OSError("disk went away during the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_json(target, {"a": 2})
    monkeypatch.undo()

    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": (1, 2), "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert config_hash({"a": 1}) == hashlib.sha256(b'{"a":1}').hexdigest()
    with pytest.raises(ValueError):
        config_hash({"a": float("nan")})


def test_fingerprint_dataset():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    assert fingerprint_dataset(dataset) == dataset._fingerprint

    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    canonical = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert fingerprint_dataset(rows) == hashlib.sha256(canonical.encode()).hexdigest()
    assert fingerprint_dataset(rows) == fingerprint_dataset([{"label": 0, "text": "a"}, rows[1]])
    assert fingerprint_dataset(rows) != fingerprint_dataset(rows[::-1])
    assert fingerprint_dataset(dataset.to_iterable_dataset()) == fingerprint_dataset(rows)
    with pytest.raises(TypeError, match="row 0 is a str"):
        fingerprint_dataset(["a"])


def _writer_main(mode: str, path: str, *args: str) -> None:
    """Child process for the crash and multi-process tests."""
    if mode == "kill-me":
        # Writes and reports batches until the test kills it; alone it would take > 12 s.
        spec = make_spec(num_rows=2000, dim=64, shard_rows=128, config={"big": True})
        store = VectorStore.create_or_open(path, spec)
        for start, end in store.pending_batches(8):
            store.write(start, make_rows(start, end, 64))
            print(start, flush=True)
            time.sleep(0.05)
    elif mode == "rank":
        rank, world_size = int(args[0]), int(args[1])
        store = VectorStore.open(path, mode="r+")
        # Batch index from the row, not the list position: the other rank may already have
        # removed some batches from the pending list.
        for start, end in store.pending_batches(BATCH):
            if (start // BATCH) % world_size == rank:
                store.write(start, make_rows(start, end))


if __name__ == "__main__":
    _writer_main(*sys.argv[1:])


def _flip_byte(store_path: Path, row: int) -> None:
    """Change one byte of store row `row` on disk (shard 0), behind the store's back."""
    shard = np.load(store_path / "shard-00000.npy", mmap_mode="r+")
    shard.view(np.uint8)[row, 5] ^= 0xFF
    shard.flush()


def test_a_row_changed_between_a_crash_and_its_resume_is_computed_again(tmp_path, caplog):
    build_reference(tmp_path / "ref", make_spec())
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)
    for start, end in store.pending_batches(BATCH)[:2]:  # the run that crashed wrote two batches
        store.write(start, make_rows(start, end))
    del store
    _flip_byte(tmp_path / "s", 3)
    resumed = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=ROW_IDS)
    assert "1 written rows changed on disk since they were written (first: row 3)" in caplog.text
    assert resumed.pending_batches(BATCH)[0] == (0, BATCH)  # the damaged row's batch is redone
    fill(resumed)
    resumed.update_manifest()
    assert dir_bytes(tmp_path / "s") == dir_bytes(tmp_path / "ref")  # sealed as an undamaged run seals it


def test_a_store_with_a_row_changed_since_it_was_written_is_not_sealed(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec())
    fill(store)
    _flip_byte(tmp_path / "s", 6)
    with pytest.raises(CorruptStoreError, match="1 rows changed on disk after they were written \\(first: row 6\\); "
                                                "the store is not sealed"):
        store.update_manifest()
    assert not store.manifest.get("checksums") and store.pending_rows().tolist() == [6]
