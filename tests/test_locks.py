"""The work_dir lock: a second run on a held work_dir is refused in one line naming the holder and writes nothing;
a lock left by a process that died is taken over; two processes racing on one work_dir leave exactly the stores
and warm-up a solo run leaves. Run as a script, this file is the racing process."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_influence import select_by_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.locks import HOLDER_FILE, LOCK_FILE, WorkDirLockedError, work_dir_lock
from hf_influence.testing import tiny_causal_lm

# Small and quiet selection options (1 JVP block, a 2-step warm-up, small projections).
FAST = {"num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "projection_dim": 256,
        "jvp_projection_dim": 128, "num_landmarks": 6, "show_progress": False}
LOCK_FILES = {LOCK_FILE, HOLDER_FILE}


def _holding_process(work_dir: Path, then: str) -> subprocess.Popen:
    """A python process that takes the lock, says so on stdout, then `then` ("exit" without releasing it, or
    "wait" until its stdin closes)."""
    code = (f"import os, sys; from hf_influence.locks import work_dir_lock\n"
            f"lock = work_dir_lock({str(work_dir)!r}); lock.__enter__(); print('held', flush=True)\n"
            + ("os._exit(0)\n" if then == "exit" else "sys.stdin.read()\n"))
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.slow
def test_a_held_work_dir_is_refused_naming_its_holder(tmp_path):
    holder = _holding_process(tmp_path, "wait")
    try:
        with pytest.raises(WorkDirLockedError) as refused:
            with work_dir_lock(tmp_path):
                pytest.fail("the lock was taken twice")
        message = str(refused.value)
        assert f"in use by another run (process {holder.pid} on " in message and "\n" not in message
    finally:
        holder.communicate("")
    with work_dir_lock(tmp_path):  # released with its process
        assert json.loads((tmp_path / HOLDER_FILE).read_text())["pid"] != holder.pid


@pytest.mark.slow
def test_the_lock_of_a_process_that_died_is_taken_over(tmp_path):
    dead = _holding_process(tmp_path, "exit")
    dead.wait()
    with work_dir_lock(tmp_path):  # no staleness rule to wait out: the OS dropped the dead process's lock
        pass


def _select(pool, work_dir):
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    return select_by_influence(pool, demo_target("math", 2, seed=1), model=model, tokenizer=tokenizer, budget=4,
                               work_dir=str(work_dir), **FAST)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in LOCK_FILES}


@pytest.mark.slow
def test_two_runs_racing_on_one_work_dir_leave_what_a_solo_run_leaves(tmp_path):
    shared = tmp_path / "shared"
    # The first run pauses inside the lock (in its warm-up) until the second one has been refused.
    racing = subprocess.Popen([sys.executable, __file__, str(shared), str(tmp_path / "go")], stdout=subprocess.PIPE,
                              text=True)
    assert racing.stdout.readline().strip() == "warming up"
    before = _files(shared)
    with pytest.raises(WorkDirLockedError, match=f"process {racing.pid} on"):
        _select(demo_pool(3, seed=5), shared)  # another pool: its warm-up would have replaced the first's
    assert _files(shared) == before  # the refused run wrote nothing
    (tmp_path / "go").touch()
    assert racing.wait(timeout=600) == 0
    solo = tmp_path / "solo"
    _select(demo_pool(2, seed=0), solo)
    assert _files(shared) == _files(solo) and _files(solo)


def _racing_run(work_dir: str, go: str) -> None:
    """The first racer: the solo run's selection, pausing in its warm-up until `go` exists."""
    from hf_influence.methods import stores

    real = stores.warmup

    def paused(*args, **kwargs):
        print("warming up", flush=True)
        while not Path(go).exists():
            time.sleep(0.05)
        return real(*args, **kwargs)

    stores.warmup = paused
    _select(demo_pool(2, seed=0), work_dir)


if __name__ == "__main__":
    _racing_run(*sys.argv[1:3])
