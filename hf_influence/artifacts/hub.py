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
import warnings
from pathlib import Path
from types import SimpleNamespace

import scipy.stats
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from torch import Tensor

from .cards import TAGS, card_template

# The score tables' Hub functions live beside ScoreTable (its push_to_hub / from_pretrained use them); they are
# this module's public API too.
from .scores import load_score_table, push_score_table

__all__ = ["PLOT_FILE", "influence_network_card", "load_score_table", "plot_predicted_vs_true",
           "push_influence_network", "push_score_table", "scatter_svg"]

# File name of the predicted-vs-true plot beside a network's weights (its card shows it).
PLOT_FILE = "predicted_vs_true.png"


def plot_predicted_vs_true(predicted: Tensor, true: Tensor, path: str | Path, what: str = "unseen rows and targets",
                           max_points: int = 5000) -> Path:
    """Draw a PNG scatter plot of an InfluenceNetwork's predictions against the oracle's values, with the y = x
    line, ticks, and the pairs' count and Spearman in the title.

    Args:
        predicted, true: 1-D tensors of the same length (influence values, the oracle's units).
        path: the file to write (PNG for the card; the format follows the suffix).
        what: which pairs they are, for the title (default: the Q4 quadrant's).
        max_points: an even subsample of at most this many pairs is drawn (the Spearman uses them all).

    Returns:
        path, as a Path.
    """
    # The object-oriented API with no pyplot: no global figure state, no GUI backend needed on a server.
    from matplotlib.figure import Figure

    predicted, true = predicted.flatten().double(), true.flatten().double()
    rho = scipy.stats.spearmanr(predicted.numpy(), true.numpy()).statistic if predicted.numel() > 1 else float("nan")
    if predicted.numel() > max_points:
        keep = torch.linspace(0, predicted.numel() - 1, max_points).long()
        predicted, true = predicted[keep], true[keep]
    figure = Figure(figsize=(4.8, 4.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.scatter(true.numpy(), predicted.numpy(), s=6, alpha=0.4, color="tab:blue", linewidths=0)
    low = float(torch.minimum(predicted.min(), true.min()))
    high = float(torch.maximum(predicted.max(), true.max()))
    axes.plot([low, high], [low, high], linestyle="--", color="0.5", linewidth=1, label="y = x")
    axes.set_xlabel("true influence (oracle)")
    axes.set_ylabel("predicted influence (network)")
    axes.set_title(f"{what}: {len(true):,} pairs shown, Spearman {rho:.3f}", fontsize=9)
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path)  # the format follows the file's suffix
    return Path(path)


def scatter_svg(predicted: Tensor, true: Tensor, max_points: int = 2000, size: int = 360) -> str:
    """Deprecated (the card's plot is now `PLOT_FILE`, a PNG): the same plot as SVG text. `size` is ignored."""
    warnings.warn("hf_influence.artifacts.hub.scatter_svg is deprecated and will be removed in the next version: use "
                  "plot_predicted_vs_true(predicted, true, path), which draws the card's PNG.", FutureWarning,
                  stacklevel=2)
    with tempfile.TemporaryDirectory() as folder:
        return plot_predicted_vs_true(predicted, true, Path(folder, "plot.svg"), max_points=max_points).read_text()


def influence_network_card(network, repo_id: str, training: dict, evaluation: dict | None = None,
                           plot_file: str | None = None, license: str | None = None,
                           training_data: str | None = None) -> ModelCard:
    """The model card of an InfluenceNetwork, rendered from `model_cards/influence_network.md`.

    Args:
        network: the InfluenceNetwork (its config gives oracle, valuation model, encoder, label range).
        repo_id: where it will live (for the usage snippet).
        training: {"block_rows", "block_columns", "block_fraction"} of the training block.
        evaluation: `network.evaluate(...)` output ({"Q1": {...}, ...}); None leaves the table empty.
        plot_file: file name of the predicted-vs-true plot in the repo, if any.
        license: the card's licence (the user's call: it follows the oracle's data and models); None leaves it out.
        training_data: Markdown for the card's "Training data" section (where the block's rows and targets came
            from, their licences); None leaves the section out.
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
        quadrants=quadrants, plot_file=plot_file, training_data=training_data,
    )


def push_influence_network(network, repo_id: str, training: dict, evaluation: dict | None = None,
                           plot: tuple[Tensor, Tensor] | None = None, private: bool | None = None,
                           token: str | None = None, license: str | None = None) -> str:
    """Push an InfluenceNetwork (safetensors + config.json), its card and a predicted-vs-true plot in one commit.

    Args:
        plot: (predicted, true) values (e.g. the Q4 quadrant) for `predicted_vs_true.png`; None for no plot.
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
            plot_file = plot_predicted_vs_true(*plot, Path(folder, PLOT_FILE)).name
        card = influence_network_card(network, repo_id, training, evaluation, plot_file, license)
        Path(folder, "README.md").write_text(str(card))
        api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload InfluenceNetwork")
    return f"{api.endpoint}/{repo_id}"
