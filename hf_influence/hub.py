"""Score tables and InfluenceNetworks on the Hugging Face Hub, with cards from `model_cards/`.

InfluenceNetworks: `push_influence_network` uploads the weights (safetensors) and config, a model card with the
oracle, valuation model, encoder, training block and measured Q1..Q4 errors, and a predicted-vs-true plot, in
one commit; `InfluenceNetwork.from_pretrained(repo_id)` loads it back strictly.

Score tables: dataset repos with one config per run and a provenance card.

`push_score_table(table, repo_id, config_name)` pushes the table's rows with `Dataset.push_to_hub` (one config
per target set), its provenance as `provenance/{config}.json`, and a dataset card rendered from
`model_cards/score_table.md` that lists every config of the repo. `load_score_table(repo_id, config_name)`
reads both back (parquet and JSON: nothing is unpickled).
"""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from torch import Tensor

from .scores import HUB_TAG, ScoreTable, ScoreTableError

TAGS = [HUB_TAG, "data-selection", "influence-functions"]


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


def scatter_svg(predicted: Tensor, true: Tensor, max_points: int = 2000, size: int = 360) -> str:
    """A small SVG scatter plot of predicted vs true values (1-D tensors), with the y = x line."""
    predicted, true = predicted.flatten().double(), true.flatten().double()
    if predicted.numel() > max_points:  # an even subsample keeps the file small
        keep = torch.linspace(0, predicted.numel() - 1, max_points).long()
        predicted, true = predicted[keep], true[keep]
    low = float(torch.minimum(predicted.min(), true.min()))
    high = float(torch.maximum(predicted.max(), true.max()))
    span = (high - low) or 1.0
    margin = 40

    def position(value: float, flip: bool) -> float:
        fraction = (value - low) / span
        return margin + (1 - fraction if flip else fraction) * (size - 2 * margin)

    points = "".join(
        f'<circle cx="{position(t, False):.1f}" cy="{position(p, True):.1f}" r="1.5"/>'
        for p, t in zip(predicted.tolist(), true.tolist())
    )
    a, b = margin, size - margin
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
        f'<line x1="{a}" y1="{b}" x2="{b}" y2="{a}" stroke="#999" stroke-dasharray="4"/>'
        f'<rect x="{a}" y="{a}" width="{b - a}" height="{b - a}" fill="none" stroke="black"/>'
        f'<g fill="#1f77b4" fill-opacity="0.5">{points}</g>'
        f'<text x="{size / 2}" y="{size - 10}" text-anchor="middle">true influence</text>'
        f'<text x="12" y="{size / 2}" text-anchor="middle" transform="rotate(-90 12 {size / 2})">predicted</text>'
        f'<text x="{a}" y="{b + 14}">{low:.3g}</text><text x="{b}" y="{b + 14}" text-anchor="end">{high:.3g}</text>'
        "</svg>"
    )


def influence_network_card(network, repo_id: str, training: dict, evaluation: dict | None = None,
                           plot_file: str | None = None, license: str | None = None) -> ModelCard:
    """The model card of an InfluenceNetwork, rendered from `model_cards/influence_network.md`.

    Args:
        network: the InfluenceNetwork (its config gives oracle, valuation model, encoder, label range).
        repo_id: where it will live (for the usage snippet).
        training: {"block_rows", "block_columns", "block_fraction"} of the training block.
        evaluation: `network.evaluate(...)` output ({"Q1": {...}, ...}); None leaves the table empty.
        plot_file: file name of the predicted-vs-true plot in the repo, if any.
        license: the card's licence (the user's call: it follows the oracle's data and models); None leaves it out.
    """
    config = network.config
    # Figures an older network does not carry (per-target Spearman) show as n/a.
    quadrants = {name: SimpleNamespace(**{"column_spearman": None, **values})
                 for name, values in (evaluation or {}).items() if name in ("Q1", "Q2", "Q3", "Q4")}
    # The measured generalisation as model-index metrics, so the Hub shows them: the quadrant of unseen rows and
    # targets (Q4; Q3 for a pointwise network).
    unseen = quadrants.get("Q4") or quadrants.get("Q3")
    eval_results = None if unseen is None else [
        EvalResult(task_type="tabular-regression", dataset_type="hf-influence/oracle-values",
                   dataset_name=f"{config['oracle']} influence on unseen rows and targets",
                   metric_type=metric, metric_name=name, metric_value=value)
        for metric, name, value in (("spearmanr", "Spearman (unseen rows and targets)", unseen.spearman),
                                    ("mse", "MSE, min-max-normalised labels", unseen.mse),
                                    ("mse", "MSE of predicting the mean", unseen.mean_baseline_mse))
        if value is not None]
    card_data = ModelCardData(library_name="hf-influence", tags=TAGS + ["nn-cift"], license=license,
                              model_name=repo_id, eval_results=eval_results or None)
    return ModelCard.from_template(
        card_data, template_str=card_template("influence_network.md"), repo_id=repo_id,
        oracle=config["oracle"], valuation_model=config.get("valuation_model"),
        embedding_model=config["embedding_model"], embedding_dim=config["embedding_dim"],
        hidden_sizes=config["hidden_sizes"], num_parameters=sum(p.numel() for p in network.parameters()),
        kind_description=("the score of a (pool, target) pair from their concatenated embeddings."
                          if config["kind"] == "pairwise" else "a per-pool-sample score from its embedding alone."),
        label_min=config["label_min"], label_max=config["label_max"], seed=config.get("seed"),
        block_rows=training.get("block_rows"), block_columns=training.get("block_columns"),
        block_fraction=training.get("block_fraction"), top_k=(evaluation or {}).get("k", 10),
        quadrants=quadrants, plot_file=plot_file,
    )


def push_influence_network(network, repo_id: str, training: dict, evaluation: dict | None = None,
                           plot: tuple[Tensor, Tensor] | None = None, private: bool | None = None,
                           token: str | None = None, license: str | None = None) -> str:
    """Push an InfluenceNetwork (safetensors + config.json), its card and a predicted-vs-true plot in one commit.

    Args:
        plot: (predicted, true) values (e.g. the Q4 quadrant) for `predicted_vs_true.svg`; None for no plot.
        license: the card's licence (it follows the oracle's data and models); None leaves it out.
    Returns:
        The URL of the model repo.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        network.save_pretrained(folder)
        plot_file = None
        if plot is not None:
            plot_file = "predicted_vs_true.svg"
            Path(folder, plot_file).write_text(scatter_svg(*plot))
        card = influence_network_card(network, repo_id, training, evaluation, plot_file, license)
        Path(folder, "README.md").write_text(str(card))
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload InfluenceNetwork")
    return f"{api.endpoint}/{repo_id}"
