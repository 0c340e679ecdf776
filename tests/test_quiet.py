"""The library is as quiet as Hugging Face's own switches ask: transformers' verbosity and progress-bar switches
(plus datasets' for its map bars) silence every line a selection would print, the nested warm-up trainer's
included; at the default verbosity a skipped row is warned about once."""

import datasets
import pytest
from transformers.utils import logging as hf_logging

from hf_influence import select_by_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.testing import lora_model

FAST = {"num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "projection_dim": 64,
        "jvp_projection_dim": 32, "num_landmarks": 8}


@pytest.fixture
def hf_switches():
    verbosity = hf_logging.get_verbosity()
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()
    datasets.enable_progress_bars()


def _rows():
    pool = demo_pool(4, seed=0).to_list()
    # One row whose response is truncated away: formatting skips it (and says so).
    pool.append({"id": "long", "source": "demo/long", "messages": [
        {"role": "user", "content": "word " * 2000}, {"role": "assistant", "content": "yes"}]})
    return pool, demo_target("math", 2, seed=1)


def _select(verbosity: int, capfd) -> tuple[str, str]:
    """A landmark ID selection on the tiny model at the given transformers verbosity, progress bars off (HF's
    switches, datasets' included); returns what it printed (stdout, stderr)."""
    model, tokenizer = lora_model(seed=0)
    pool, target = _rows()
    hf_logging.set_verbosity(verbosity)
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    capfd.readouterr()
    selected = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=3, max_length=256,
                                   truncation="drop", **FAST)
    assert len(selected) == 3
    return capfd.readouterr()


def test_a_selection_prints_nothing_under_hf_switches(hf_switches, capfd):
    out, err = _select(hf_logging.ERROR, capfd)
    assert out == "" and err == "", (out, err)


def test_a_skipped_row_is_warned_about_once_at_the_default_verbosity(hf_switches, capfd, caplog):
    out, _ = _select(hf_logging.WARNING, capfd)
    skipped = [record for record in caplog.records if "skipped" in record.getMessage()]
    assert len(skipped) == 1 and skipped[0].name.startswith("hf_influence"), [r.getMessage() for r in skipped]
    assert "loss" not in out and "train_runtime" not in out  # the warm-up trainer printed nothing


def test_duplicate_pool_rows_are_counted_warned_and_recorded(caplog):
    from hf_influence import compute_scores
    from hf_influence.engine import duplicate_pool_rows

    pool = demo_pool(3, seed=0).to_list()
    pool.append({**pool[2], "id": "copy-of-2"})  # the same content under another id
    pool.append({**pool[5], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    found = duplicate_pool_rows(datasets.Dataset.from_list(pool))
    assert found == {"id": {"repeated_rows": 1, "first": [5, 13]}, "content": {"repeated_rows": 1, "first": [2, 12]}}
    assert duplicate_pool_rows(datasets.Dataset.from_list(pool[:12])) == {}
    run = compute_scores(pool, demo_target("math", 2, seed=1), method="random")
    assert run.provenance["duplicate_pool_rows"] == found
    messages = [record.getMessage() for record in caplog.records if "repeat an earlier row" in record.getMessage()]
    assert len(messages) == 2 and "row 13 repeats row 5" in messages[0]
