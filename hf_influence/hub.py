"""Score tables on the Hugging Face Hub: dataset repos with one config per run and a provenance card.

`push_score_table(table, repo_id, config_name)` pushes the table's rows with `Dataset.push_to_hub` (one config
per target set), its provenance as `provenance/{config}.json`, and a dataset card rendered from
`model_cards/score_table.md` that lists every config of the repo. `load_score_table(repo_id, config_name)`
reads both back (parquet and JSON: nothing is unpickled).
"""

from __future__ import annotations

import json
from importlib import resources

import datasets
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from .scores import ScoreTable, ScoreTableError

TAGS = ["hf-influence", "data-selection", "influence-functions"]


def card_template(name: str) -> str:
    """The text of a card template in `model_cards/` (installed as the package `hf_influence.model_cards`)."""
    return resources.files("hf_influence.model_cards").joinpath(name).read_text()


def _provenance_path(config_name: str) -> str:
    return f"provenance/{config_name}.json"


def _config_summary(name: str, provenance: dict) -> dict:
    landmarks = provenance.get("details", {}).get("num_landmarks")
    return {
        "name": name,
        "method": provenance.get("method"),
        "selection": provenance.get("selection"),
        "model_id": provenance.get("model_id"),
        "model_revision": provenance.get("model_revision"),
        "pool_rows": provenance.get("pool_rows", "?"),
        "targets": provenance.get("target_count", "?"),
        "budget": provenance.get("budget"),
        "landmarks": "all (exact)" if landmarks is None else landmarks,
        "pool_fingerprint": provenance.get("pool_fingerprint"),
        "target_fingerprint": provenance.get("target_fingerprint"),
        "hf_influence_version": provenance.get("hf_influence_version"),
    }


def push_score_table(table: ScoreTable, repo_id: str, config_name: str = "default", private: bool | None = None,
                     token: str | None = None, pretty_name: str | None = None) -> str:
    """Push `table` as config `config_name` of the dataset repo `repo_id` (created if needed).

    Writes the rows (parquet, via `Dataset.push_to_hub`), `provenance/{config_name}.json`, and the dataset
    card (every config of the repo summarised, with usage). Returns the URL of the repo.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    provenance = {**table.provenance, "pool_rows": len(table.pool_row_ids), "target_count": len(table.targets)}
    table.dataset.push_to_hub(repo_id, config_name=config_name, split="train", token=token,
                              commit_message=f"Score table {config_name}")
    api.upload_file(path_or_fileobj=json.dumps(provenance, indent=2, sort_keys=True).encode(),
                    path_in_repo=_provenance_path(config_name), repo_id=repo_id, repo_type="dataset",
                    commit_message=f"Provenance of {config_name}")
    # push_to_hub wrote the configs / dataset_info metadata into README.md: keep it, add ours.
    metadata = DatasetCard.load(repo_id, repo_type="dataset", token=token).data.to_dict()
    metadata["tags"] = sorted(set(metadata.get("tags") or []) | set(TAGS))
    metadata["pretty_name"] = pretty_name or metadata.get("pretty_name") or repo_id.split("/")[-1]
    names = [entry["config_name"] for entry in metadata.get("configs", [])] or [config_name]
    summaries = [_config_summary(name, provenance if name == config_name
                                 else _remote_provenance(repo_id, name, token=token) or {}) for name in names]
    card = DatasetCard.from_template(
        DatasetCardData(**metadata), template_str=card_template("score_table.md"), repo_id=repo_id,
        pretty_name=metadata["pretty_name"], configs=summaries, example_config=config_name,
    )
    card.push_to_hub(repo_id, repo_type="dataset", token=token, commit_message="Update the score table card")
    return f"{api.endpoint}/datasets/{repo_id}"


def _remote_provenance(repo_id: str, config_name: str, revision: str | None = None,
                       token: str | None = None) -> dict | None:
    try:
        path = hf_hub_download(repo_id, _provenance_path(config_name), repo_type="dataset", revision=revision,
                               token=token)
    except EntryNotFoundError:
        return None
    with open(path) as handle:
        return json.load(handle)


def load_score_table(repo_id: str, config_name: str = "default", revision: str | None = None,
                     token: str | None = None) -> ScoreTable:
    """Load config `config_name` of a score-table dataset repo pushed by `push_score_table`.

    Raises:
        ScoreTableError: the repo has no provenance for that config, or its rows do not have the score-table
            schema (the message names the repo and config).
    """
    provenance = _remote_provenance(repo_id, config_name, revision=revision, token=token)
    if provenance is None:
        raise ScoreTableError(f"{repo_id} has no {_provenance_path(config_name)}: it is not a score table pushed by "
                              f"hf-influence, or it has no config {config_name!r}.")
    dataset = datasets.load_dataset(repo_id, config_name, split="train", revision=revision, token=token)
    try:
        return ScoreTable(dataset, provenance)
    except ScoreTableError as error:
        raise ScoreTableError(f"{repo_id} config {config_name!r} is not a score table: {error}") from error
