"""ScoreTable: matrix round trips, Parquet + JSON persistence, atomic saves and input validation."""

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hf_influence import __version__
from hf_influence.artifacts.scores import SCHEMA, ScoreTable, ScoreTableError, provenance_record

POOL_IDS = [12, 3, 40, 7, 0]
TARGETS = ["task/gsm8k", "target/2", "target/10"]


@pytest.fixture
def table():
    scores = torch.randn(len(POOL_IDS), len(TARGETS), generator=torch.Generator().manual_seed(0))
    return ScoreTable.from_matrix(
        scores,
        POOL_IDS,
        TARGETS,
        weights=torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5]),
        landmark_mask=torch.tensor([True, False, False, True, False]),
        provenance=provenance_record(model_id="tiny", model_revision=None, method="influence_distillation",
                                     config={"projection_dim": 8}),
    )


def test_from_matrix_round_trip_is_exact(table):
    scores = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    matrix, pool_row_ids, targets = table.to_matrix()
    assert matrix.dtype == torch.float32
    assert torch.equal(matrix, scores)
    assert pool_row_ids == POOL_IDS and targets == TARGETS
    assert table.pool_row_ids == POOL_IDS and table.targets == TARGETS
    assert torch.equal(table.weights, torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5]))
    assert torch.equal(table.landmark_mask, torch.tensor([True, False, False, True, False]))
    assert len(table) == 15 and table.dataset.features == SCHEMA
    assert table.dataset[:4]["pool_row_id"] == [12, 12, 12, 3]
    assert table.dataset[:4]["target"] == TARGETS + ["task/gsm8k"]
    assert "15 scores" in repr(table)


def test_shuffled_rows_keep_every_score_under_its_labels(table):
    matrix, pool_row_ids, targets = table.to_matrix()
    shuffled = ScoreTable(table.dataset.shuffle(seed=1).flatten_indices(), table.provenance)
    shuffled_matrix, shuffled_ids, shuffled_targets = shuffled.to_matrix()
    assert sorted(shuffled_ids) == sorted(pool_row_ids) and sorted(shuffled_targets) == sorted(targets)
    rows = [shuffled_ids.index(i) for i in pool_row_ids]
    columns = [shuffled_targets.index(t) for t in targets]
    assert torch.equal(shuffled_matrix[rows][:, columns], matrix)
    assert torch.equal(shuffled.weights[rows], table.weights)
    assert torch.equal(shuffled.landmark_mask[rows], table.landmark_mask)


def test_missing_or_duplicated_pair_is_refused(table):
    with pytest.raises(ScoreTableError, match=r"pool row id 0, target 'target/10' is missing"):
        ScoreTable(table.dataset.select(range(14)), table.provenance).to_matrix()
    with pytest.raises(ScoreTableError, match=r"pool row id 12, target 'task/gsm8k' appears 2 times"):
        ScoreTable(table.dataset.select([0, *range(14)]), table.provenance).to_matrix()


def test_weights_default_to_nan_and_mask_to_false():
    table = ScoreTable.from_matrix(torch.ones(2, 2), [0, 1], ["a", "b"])
    assert torch.isnan(table.weights).all() and table.weights.shape == (2,)
    assert not table.landmark_mask.any()
    assert table.provenance == {"hf_influence_version": __version__, "format_version": 1}


def test_save_load_round_trip(table, tmp_path):
    path = table.save(tmp_path / "run")
    assert sorted(p.name for p in path.iterdir()) == ["provenance.json", "scores.parquet"]
    text = (path / "provenance.json").read_text()
    assert text == json.dumps(table.provenance, sort_keys=True, indent=2) + "\n"
    loaded = ScoreTable.load(path)
    assert loaded.dataset.features == SCHEMA
    assert loaded.dataset.to_dict() == table.dataset.to_dict()
    assert loaded.provenance == table.provenance
    assert torch.equal(loaded.to_matrix()[0], table.to_matrix()[0])


def test_save_replaces_an_existing_table_and_leaves_no_temporary_folder(table, tmp_path):
    ScoreTable.from_matrix(torch.zeros(1, 1), [0], ["a"]).save(tmp_path / "run")
    table.save(tmp_path / "run")
    assert ScoreTable.load(tmp_path / "run").dataset.to_dict() == table.dataset.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_save_refuses_a_folder_that_is_not_a_score_table(table, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(ScoreTableError, match="not a score table"):
        table.save(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_failed_save_keeps_the_old_table(table, tmp_path, monkeypatch):
    old = ScoreTable.from_matrix(torch.zeros(1, 1), [0], ["a"], weights=torch.ones(1))
    old.save(tmp_path / "run")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        table.save(tmp_path / "run")
    assert ScoreTable.load(tmp_path / "run").dataset.to_dict() == old.dataset.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("missing", ["scores.parquet", "provenance.json"])
def test_load_names_a_missing_file(table, tmp_path, missing):
    path = table.save(tmp_path / "run")
    (path / missing).unlink()
    with pytest.raises(ScoreTableError, match=f"{missing} is missing"):
        ScoreTable.load(path)


def test_load_refuses_a_wrong_dtype_or_missing_column(table, tmp_path):
    path = table.save(tmp_path / "run")
    arrow = pq.read_table(path / "scores.parquet")
    pq.write_table(arrow.set_column(2, "score", arrow["score"].cast(pa.float64())), path / "scores.parquet")
    expected = r"scores\.parquet: column 'score' has Arrow type double, expected float32"
    with pytest.raises(ScoreTableError, match=expected):
        ScoreTable.load(path)
    pq.write_table(arrow.drop_columns(["weight"]), path / "scores.parquet")
    with pytest.raises(ScoreTableError, match="column 'weight' is missing"):
        ScoreTable.load(path)


def test_a_table_with_a_non_finite_score_is_refused_on_load(table, tmp_path):
    path = table.save(tmp_path / "run")
    arrow = pq.read_table(path / "scores.parquet")
    scores = arrow["score"].to_numpy().copy()
    scores[4] = np.nan
    pq.write_table(arrow.set_column(2, "score", pa.array(scores, pa.float32())), path / "scores.parquet")
    row = arrow.slice(4, 1).to_pylist()[0]
    with pytest.raises(ScoreTableError, match=f"1 non-finite scores.*pool row id {row['pool_row_id']}, target "
                                              f"'{row['target']}'"):
        ScoreTable.load(path)


def test_load_refuses_provenance_that_is_not_an_object(table, tmp_path):
    path = table.save(tmp_path / "run")
    (path / "provenance.json").write_text("[1, 2]")
    with pytest.raises(ScoreTableError, match=r"provenance\.json must hold a JSON object, got a list"):
        ScoreTable.load(path)
    (path / "provenance.json").write_text("{not json")
    with pytest.raises(ScoreTableError, match="not valid JSON"):
        ScoreTable.load(path)


def test_load_never_unpickles(table, tmp_path, monkeypatch):
    path = table.save(tmp_path / "run")

    def refuse(*args, **kwargs):
        raise AssertionError("ScoreTable.load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = ScoreTable.load(path)
    assert torch.equal(loaded.to_matrix()[0], table.to_matrix()[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": torch.zeros(4)}, "scores must be 2-D"),
        ({"pool_row_ids": [0, 1]}, "pool_row_ids must be 3 ints"),
        ({"pool_row_ids": [0.0, 1.0, 2.0]}, "pool_row_ids must be 3 ints"),
        ({"targets": ["a"]}, "targets must be 2 strings"),
        ({"weights": torch.ones(2)}, r"weights must have shape \(3,\)"),
        ({"landmark_mask": torch.ones(4, dtype=torch.bool)}, r"landmark_mask must have shape \(3,\)"),
        ({"pool_row_ids": [5, 1, 5]}, "pool_row_ids must be unique; 5 appears"),
        ({"targets": ["a", "a"]}, "targets must be unique; 'a' appears"),
        ({"scores": torch.tensor([[0.0, 1.0], [2.0, float("nan")], [float("nan"), 0.0]])},
         "scores has nan for pool row id 11, target 'b'"),
    ],
)
def test_from_matrix_validation_names_the_argument(kwargs, message):
    arguments = {"scores": torch.zeros(3, 2), "pool_row_ids": [10, 11, 12], "targets": ["a", "b"], **kwargs}
    with pytest.raises(ScoreTableError, match=message):
        ScoreTable.from_matrix(**arguments)


def test_provenance_record_adds_versions_and_checks_json():
    record = provenance_record(method="rds+", config={"batch_size": 8})
    assert record == {"method": "rds+", "config": {"batch_size": 8}, "hf_influence_version": __version__,
                      "format_version": 1}
    with pytest.raises(ScoreTableError, match="Provenance field 'config' is not JSON-serialisable"):
        provenance_record(config={"dtype": torch.float32})
    # Strict JSON has no NaN / inf: they become null (e.g. an undefined Spearman correlation).
    assert provenance_record(ridge=float("nan"), metrics={"q4": [1.0, float("inf")]})["metrics"] == {"q4": [1.0, None]}


def test_large_table_is_built_and_read_without_per_row_python():
    # 2 million rows: per-row Python objects would take tens of seconds; this takes well under one.
    scores = torch.from_numpy(np.random.default_rng(0).standard_normal((100_000, 20), dtype=np.float32))
    table = ScoreTable.from_matrix(scores, range(100_000), [f"t{j}" for j in range(20)])
    assert torch.equal(table.to_matrix()[0], scores)
