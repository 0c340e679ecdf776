"""Target tasks of the data-selection literature (GSM8K, MMLU, BBH, TyDiQA, SQuAD, Codex) as prompt/response rows.

LESS and Influence Distillation select for a handful of held-out examples of the task, not its test set. Each
task here knows its Hub dataset and the few-shot split the papers use; `load_target` turns any of the schemas
below into rows with `prompt`, `completion` (TRL's prompt-completion form), `task` and `id` columns that
`select_by_influence` and the trainer read directly:

- Hub schemas: GSM8K (question / answer), MMLU (question / choices / answer index), BBH (input / target),
  TyDiQA GoldP and SQuAD (context / question / answers.text), HumanEval (prompt / canonical_solution);
- the schema of ../shared/data/targets (prompt / answer, GSM8K rows also carry `solution`).

The schema is recognised from the columns, so a local file in a Hub schema works as well as the Hub itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, concatenate_datasets, get_dataset_config_names

from .data import load_rows, sample_rows
from .errors import HFInfluenceError

# Environment variable naming the offline data folder that `load_target` reads when no data_dir is passed.
DATA_DIR_ENV = "HF_INFLUENCE_DATA_DIR"


@dataclass(frozen=True)
class TargetTask:
    """Where a target task lives and which column groups its rows into subtasks.

    Attributes:
        hub_id: Hub dataset id (`owner/name`, optionally `owner/name:config`).
        split: split holding the few-shot rows used as the selection target.
        local_file: file of the same rows in the shared offline data folder (None: none there).
        task_column: source column naming the subtask of a row (BBH subtask, MMLU subject, TyDiQA language).
        held_out_split: Hub split of held-out rows to measure the trained model on (None: the task has none
            apart from its target rows).
        held_out_local_file: file of the held-out rows in the shared offline data folder.
        configs_are_subtasks: the Hub dataset keeps each subtask in a config of its own (lukaemon/bbh: 27
            configs, no default one); reading it from the Hub gathers every config into one table and writes
            the config name to `task_column`.
    """

    hub_id: str
    split: str
    local_file: str | None
    task_column: str | None
    held_out_split: str | None = None
    held_out_local_file: str | None = None
    configs_are_subtasks: bool = False


TARGET_TASKS: dict[str, TargetTask] = {
    "gsm8k": TargetTask("openai/gsm8k:main", "train", "targets/gsm8k_train.jsonl.gz", None,
                        "test", "targets/gsm8k_test.jsonl.gz"),
    "mmlu": TargetTask("cais/mmlu:all", "dev", "targets/mmlu_dev.jsonl.gz", "subject",
                       "test", "targets/mmlu_test.jsonl.gz"),
    "bbh": TargetTask("lukaemon/bbh", "test", "targets/bbh.jsonl.gz", "subtask", configs_are_subtasks=True),
    "tydiqa": TargetTask("google-research-datasets/tydiqa:secondary_task", "validation",
                         "targets/tydiqa_oneshot.jsonl.gz", "lang"),
    "squad": TargetTask("rajpurkar/squad", "validation", None, None),
    "codex": TargetTask("openai/openai_humaneval", "test", None, None),
}

MMLU_LETTERS = "ABCDEFGHIJ"


def _first_answer(answers) -> str:
    texts = answers["text"] if isinstance(answers, dict) else answers
    if not texts:
        raise ValueError("a row has no reference answer (answers.text is empty)")
    return texts[0]


def _reading_prompt(row: dict) -> str:
    return f"{row['context']}\n\nQuestion: {row['question']}\nAnswer:"


def _mmlu_prompt(row: dict) -> str:
    options = "\n".join(f"{MMLU_LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    return f"{row['question']}\n{options}\nAnswer:"


# (name, required columns, prompt builder, response builder), tried in order: the first whose columns are all
# present defines the schema. MMLU's `answer` is an index, GSM8K's a worked solution: MMLU goes first.
SCHEMAS: list[tuple[str, tuple[str, ...], Callable[[dict], str], Callable[[dict], str]]] = [
    ("shared (prompt / solution)", ("prompt", "solution"), lambda row: row["prompt"], lambda row: row["solution"]),
    ("shared (prompt / answer)", ("prompt", "answer"), lambda row: row["prompt"], lambda row: str(row["answer"])),
    ("HumanEval", ("prompt", "canonical_solution"), lambda row: row["prompt"], lambda row: row["canonical_solution"]),
    ("MMLU", ("question", "choices", "answer"), _mmlu_prompt, lambda row: MMLU_LETTERS[int(row["answer"])]),
    ("GSM8K", ("question", "answer"), lambda row: row["question"], lambda row: row["answer"]),
    ("BBH", ("input", "target"), lambda row: row["input"], lambda row: row["target"]),
    ("SQuAD / TyDiQA", ("context", "question", "answers"), _reading_prompt, lambda row: _first_answer(row["answers"])),
]


def to_prompt_response(rows: Dataset, task: str, task_column: str | None = None) -> Dataset:
    """Rows of a known target schema as `id`, `prompt`, `completion` and `task` columns.

    Args:
        rows: a target dataset in one of the schemas of this module.
        task: task name written to `task` (and used in generated ids).
        task_column: column whose value becomes the row's task (`{task}/{value}`), for per-subtask selection.

    Raises:
        ValueError: the columns match no known schema (the message lists the schemas), or a row has no answer.
    """
    columns = set(rows.column_names)
    for name, required, prompt, response in SCHEMAS:
        if columns.issuperset(required):
            break
    else:
        known = "; ".join(f"{name}: {', '.join(required)}" for name, required, _, _ in SCHEMAS)
        raise ValueError(f"target columns {sorted(columns)} match no known schema ({known}); "
                         "map them to prompt/response columns first")
    if task_column is not None and task_column not in columns:
        task_column = None  # Hub configs of a task may lack the subtask column the local copy has

    def convert(row: dict, index: int) -> dict:
        try:
            converted = {"prompt": prompt(row), "completion": response(row)}
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{task} row {index} ({name} schema): {error}") from error
        converted["task"] = task if task_column is None else f"{task}/{row[task_column]}"
        converted["id"] = str(row["id"]) if "id" in row else f"{task}/{index}"
        return converted

    return rows.map(convert, with_indices=True, remove_columns=rows.column_names, desc=f"{task} target")


class TargetNotFoundError(HFInfluenceError, OSError):
    """A target task whose rows are neither given, nor in a local data folder, nor readable from the Hub."""


def load_target(task: str, source: str | os.PathLike | Dataset | None = None, data_dir: str | os.PathLike | None = None,
                limit: int | None = None, seed: int = 0, held_out: bool = False) -> Dataset:
    """The rows of a target task as `id`, `prompt`, `completion`, `task` columns.

    Args:
        task: a key of TARGET_TASKS (gsm8k, mmlu, bbh, tydiqa, squad, codex).
        source: where to read the rows: a file / folder / Hub id / Dataset in any schema of this module.
            None: the task's file in `data_dir` when given and present, else its Hub dataset and split.
        data_dir: an offline data folder holding `targets/<task file>` (e.g. `targets/gsm8k_train.jsonl.gz`);
            None: `$HF_INFLUENCE_DATA_DIR` when set.
        limit: keep `limit` rows, drawn at random with `seed` (few-shot targets are small; a seeded draw
            keeps every subtask in reach, unlike the first rows).
        seed: seed of the draw.
        held_out: read the task's held-out rows (GSM8K test, MMLU test) instead of its target rows, to measure
            a trained model on rows the selection never saw.

    Raises:
        KeyError: an unknown task (the message lists the known ones).
        ValueError: held_out for a task without held-out rows.
        TargetNotFoundError: no source, no local file, and the Hub dataset cannot be read (offline): the message
            names the file `data_dir` should hold.
    """
    if task not in TARGET_TASKS:
        raise KeyError(f"unknown target task {task!r}; known: {sorted(TARGET_TASKS)}")
    spec = TARGET_TASKS[task]
    split, local_file = spec.split, spec.local_file
    if held_out:
        if spec.held_out_split is None:
            raise ValueError(f"target task {task!r} has no held-out split (tasks with one: "
                             f"{sorted(name for name, t in TARGET_TASKS.items() if t.held_out_split)}); pass the "
                             f"held-out rows as a file instead")
        split, local_file = spec.held_out_split, spec.held_out_local_file
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if source is None and data_dir is not None and local_file is not None:
        local = Path(data_dir) / local_file
        source = local if local.exists() else None
    if source is not None:
        rows = load_rows(source, split=split)
    else:
        try:
            rows = (subtask_configs(spec.hub_id, split, spec.task_column) if spec.configs_are_subtasks
                    else load_rows(spec.hub_id, split=split))
        except ConnectionError as error:
            where = (f"data_dir={str(data_dir)!r} has no {local_file}" if data_dir is not None else
                     f"pass data_dir= (or set ${DATA_DIR_ENV}) to a folder holding {local_file}" if local_file
                     else "pass source= a file or folder of its rows")
            raise TargetNotFoundError(f"load_target({task!r}) reads the Hub dataset {spec.hub_id}, which cannot be "
                                      f"reached ({error}); {where}.") from error
    return to_prompt_response(sample_rows(rows, limit, seed), task, spec.task_column)


def subtask_configs(hub_id: str, split: str, column: str) -> Dataset:
    """Every config of a Hub dataset, concatenated in the Hub's config order, with the config name in `column`.

    For datasets that keep each subtask in a config of its own (BBH); reads `split` of each config.
    """
    parts = []
    for name in get_dataset_config_names(hub_id):
        rows = load_rows(f"{hub_id}:{name}", split=split)
        parts.append(rows.add_column(column, [name] * len(rows)))
    if not parts:
        raise ValueError(f"the Hub dataset {hub_id!r} lists no config")
    return concatenate_datasets(parts)
