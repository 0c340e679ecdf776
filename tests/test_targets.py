"""Target-task loaders: every schema (Hub and shared offline files) becomes prompt/response/task/id rows."""

from pathlib import Path

import hub_server
import pytest
from datasets import Dataset

from hf_influence.targets import TARGET_TASKS, load_target, to_prompt_response

local_hub = hub_server.local_hub

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# One row per Hub schema, as the Hub datasets hold them, and the prompt/response they must give.
HUB_ROWS = [
    ("gsm8k", {"question": "2+2?", "answer": "2+2=4\n#### 4"}, "2+2?", "2+2=4\n#### 4", "gsm8k"),
    ("mmlu", {"question": "Pick b", "subject": "logic", "choices": ["a", "b", "c", "d"], "answer": 1},
     "Pick b\nA. a\nB. b\nC. c\nD. d\nAnswer:", "B", "mmlu/logic"),
    ("bbh", {"input": "not True is", "target": "False"}, "not True is", "False", "bbh"),
    ("squad", {"id": "q1", "title": "t", "context": "Paris is in France.", "question": "Where is Paris?",
               "answers": {"text": ["France", "in France"], "answer_start": [12, 9]}},
     "Paris is in France.\n\nQuestion: Where is Paris?\nAnswer:", "France", "squad"),
    ("tydiqa", {"id": "t1", "title": "t", "context": "Kigali on pääkaupunki.", "question": "Mikä?",
                "answers": {"text": ["Kigali"], "answer_start": [0]}},
     "Kigali on pääkaupunki.\n\nQuestion: Mikä?\nAnswer:", "Kigali", "tydiqa"),
    ("codex", {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
               "test": "", "entry_point": "f"}, "def f():\n", "    return 1\n", "codex"),
]


@pytest.mark.parametrize(("task", "row", "prompt", "response", "task_value"), HUB_ROWS, ids=[r[0] for r in HUB_ROWS])
def test_hub_schemas_become_prompt_response_rows(task, row, prompt, response, task_value, tmp_path):
    converted = to_prompt_response(Dataset.from_list([row, row]), task, TARGET_TASKS[task].task_column)
    assert sorted(converted.column_names) == ["completion", "id", "prompt", "task"]
    assert converted[0] == {"prompt": prompt, "completion": response, "task": task_value,
                            "id": row.get("id", f"{task}/0")}
    assert converted[1]["id"] == row.get("id", f"{task}/1")
    # The same rows from a local file in the Hub schema load through load_target.
    path = tmp_path / f"{task}.jsonl"
    Dataset.from_list([row]).to_json(path)
    assert load_target(task, source=path)[0]["completion"] == response


@pytest.mark.skipif(not DATA_DIR.exists(), reason="../shared/data is absent")
@pytest.mark.parametrize("task", [name for name, spec in TARGET_TASKS.items() if spec.local_file])
def test_shared_offline_targets_load_with_subtasks(task):
    rows = load_target(task, data_dir=DATA_DIR, limit=20, seed=0)
    assert len(rows) == min(20, len(load_target(task, data_dir=DATA_DIR)))
    assert all(row["prompt"] and row["completion"] for row in rows)
    if TARGET_TASKS[task].task_column:
        assert all(row["task"].startswith(f"{task}/") for row in rows)
    if task == "gsm8k":  # the worked solution, not the bare number, is the response
        assert "####" in rows[0]["completion"]
    again = load_target(task, data_dir=DATA_DIR, limit=20, seed=0)
    assert again["id"] == rows["id"]
    if len(rows) == 20:  # a real draw (tydiqa has 9 rows: all of them, whatever the seed)
        assert load_target(task, data_dir=DATA_DIR, limit=20, seed=1)["id"] != rows["id"]


def test_unknown_schema_task_and_missing_answer_are_named():
    with pytest.raises(ValueError, match=r"match no known schema.*GSM8K: question, answer"):
        to_prompt_response(Dataset.from_list([{"text": "x"}]), "mine")
    with pytest.raises(KeyError, match="unknown target task 'gsmk'.*gsm8k"):
        load_target("gsmk")
    empty_answer = {"context": "c", "question": "q", "answers": {"text": [], "answer_start": []}}
    with pytest.raises(ValueError, match=r"squad row 1 \(SQuAD / TyDiQA schema\).*no reference answer"):
        to_prompt_response(Dataset.from_list([HUB_ROWS[3][1], empty_answer]), "squad")


@pytest.mark.skipif(not DATA_DIR.exists(), reason="../shared/data is absent")
def test_held_out_rows_never_overlap_the_target_rows():
    for task in ("gsm8k", "mmlu"):
        target = load_target(task, data_dir=DATA_DIR)
        held_out = load_target(task, data_dir=DATA_DIR, held_out=True, limit=50)
        assert len(held_out) == 50 and not set(held_out["id"]) & set(target["id"])
        assert not set(held_out["prompt"]) & set(target["prompt"])
    with pytest.raises(ValueError, match="'bbh' has no held-out split.*gsm8k"):
        load_target("bbh", data_dir=DATA_DIR, held_out=True)


@pytest.mark.slow
def test_bbh_from_the_hub_gathers_every_subtask_config(local_hub, monkeypatch):
    import dataclasses

    repo = f"{local_hub.user}/bbh"
    subtasks = {"navigate": ["Left?", "Right?"], "word_sorting": ["b a", "d c", "f e"]}
    for name, inputs in subtasks.items():
        Dataset.from_dict({"input": inputs, "target": [f"{name}-{i}" for i in range(len(inputs))]}).push_to_hub(
            repo, config_name=name, split="test")
    monkeypatch.setitem(TARGET_TASKS, "bbh", dataclasses.replace(TARGET_TASKS["bbh"], hub_id=repo))
    target = load_target("bbh")  # no source, no data_dir: the Hub dataset, which has no default config
    assert sorted(zip(target["task"], target["prompt"], target["completion"])) == sorted(
        (f"bbh/{name}", text, f"{name}-{i}") for name, inputs in subtasks.items() for i, text in enumerate(inputs))
    assert len(load_target("bbh", limit=2, seed=1)) == 2
