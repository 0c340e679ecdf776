"""InfluenceNetworks (and, re-exported from `scores`, score tables) on the Hugging Face Hub, with cards from
`model_cards/`.

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

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from torch import Tensor

from .cards import TAGS, card_template

# The score tables' Hub functions live beside ScoreTable (its push_to_hub / from_pretrained use them); they are
# this module's public API too.
from .scores import load_score_table, push_score_table

__all__ = ["influence_network_card", "load_score_table", "push_influence_network", "push_score_table",
           "scatter_svg"]

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
