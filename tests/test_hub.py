"""Score tables through a loopback Hub with the real huggingface_hub and datasets clients."""

import hub_server
import pytest
import torch
from huggingface_hub import DatasetCard, HfApi

from hf_influence import ScoreTable, ScoreTableError
from hf_influence.artifacts.hub import load_score_table, push_score_table
from hf_influence.artifacts.scores import provenance_record

local_hub = hub_server.local_hub


def _table(seed, n=6, m=3, method="influence_distillation"):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, m, generator=generator)
    provenance = provenance_record(method=method, selection="round_robin", model_id="tiny/llama",
                                   model_revision="abc", budget=2, pool_fingerprint="pool123",
                                   target_fingerprint=f"target{seed}", details={"num_landmarks": 4})
    return ScoreTable.from_matrix(scores, list(range(10, 10 + n)), [f"t{j}" for j in range(m)],
                                  weights=torch.rand(n, generator=generator),
                                  landmark_mask=torch.arange(n) < 4, provenance=provenance)


@pytest.mark.slow
def test_push_and_load_score_tables_with_configs(local_hub):
    repo_id = f"{local_hub.user}/scores"
    gsm8k, mmlu = _table(0), _table(1, n=5, m=2, method="less")
    push_score_table(gsm8k, repo_id, config_name="gsm8k")
    mmlu.provenance["model_id"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    mmlu.push_to_hub(repo_id, config_name="mmlu", license="odc-by", source_datasets=["allenai/tulu-v2-sft-mixture"])
    for name, table in (("gsm8k", gsm8k), ("mmlu", mmlu)):
        loaded = load_score_table(repo_id, config_name=name)
        assert loaded.provenance["method"] == table.provenance["method"]
        scores, rows, targets = loaded.to_matrix()
        expected_scores, expected_rows, expected_targets = table.to_matrix()
        assert rows == expected_rows and targets == expected_targets
        assert torch.equal(scores, expected_scores)
        assert torch.equal(loaded.weights, table.weights) and torch.equal(loaded.landmark_mask, table.landmark_mask)
    card = DatasetCard.load(repo_id, repo_type="dataset")
    assert "hf_influence" in card.data.tags
    assert {entry["config_name"] for entry in card.data.to_dict()["configs"]} == {"gsm8k", "mmlu"}
    # Both configs are summarised, with their provenance, and the card passes the Hub's metadata validation.
    for text in ("### `gsm8k`", "### `mmlu`", "`less`", "target0", "target1", "load_score_table"):
        assert text in card.text
    card.validate(repo_type="dataset")
    assert card.data.license == "odc-by" and card.data.source_datasets == ["allenai/tulu-v2-sft-mixture"]
    assert "[`HuggingFaceTB/SmolLM2-135M-Instruct`](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card.text
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert {"provenance/gsm8k.json", "provenance/mmlu.json", "README.md"} <= set(files)


def test_loading_a_repo_that_is_not_a_score_table_fails_clearly(local_hub):
    repo_id = f"{local_hub.user}/plain"
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).push_to_hub(repo_id)
    with pytest.raises(ScoreTableError, match="no provenance/default.json"):
        load_score_table(repo_id)
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="provenance/default.json", repo_id=repo_id,
                        repo_type="dataset")
    with pytest.raises(ScoreTableError, match="not a score table"):
        load_score_table(repo_id)


def test_scatter_svg_still_works_for_one_version_with_a_warning():
    import torch

    from hf_influence.artifacts.hub import scatter_svg

    with pytest.warns(FutureWarning, match="plot_predicted_vs_true"):
        svg = scatter_svg(torch.arange(10.0), torch.arange(10.0) + 0.5)
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
