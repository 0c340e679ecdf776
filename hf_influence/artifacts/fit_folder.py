"""
The folder an NN-CIFT fit leaves (`hf-influence fit-network --output DIR`): one class writes it and every reader
(`load_network`, `predict`, `push`) reads it, so its layout is defined once.

    DIR/network/                       the InfluenceNetwork (save_pretrained: config, safetensors weights, card)
    DIR/scores/                        the ScoreTable of every (pool, target) pair
    DIR/report.json                    oracle, sizes, training block, seconds, evaluation (Q1-Q4)
    DIR/evaluation_pairs.safetensors   predicted and true values of the evaluated pairs (the card's plot)

The whole folder is replaced at once (store.folder_replacement): an earlier fit stays whole until this one is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..networks.network import InfluenceNetwork
from .scores import ScoreTable, json_safe
from ..extraction.store import atomic_write_json, folder_replacement


@dataclass(frozen=True)
class FitFolder:
    """A fit-network output folder at `path` (see the module docstring)."""

    path: Path

    # What a fit writes into the folder (an earlier fit's are replaced with it).
    OUTPUTS = ("network", "scores", "report.json", "evaluation_pairs.safetensors")

    @classmethod
    def write(cls, path: str | Path, network: InfluenceNetwork, table: ScoreTable, report: dict,
              evaluation_pairs: tuple[Tensor, Tensor] | None) -> FitFolder:
        """Write a fit: the network (its card gets report["training"]), its score table, the report (JSON-safe)
        and the evaluated pairs (predicted [p], true [p]) when there are any. Returns the folder."""
        folder = cls(Path(path))
        with folder_replacement(folder.path) as staging:
            if evaluation_pairs is not None:
                save_file({"predicted": evaluation_pairs[0].contiguous(), "true": evaluation_pairs[1].contiguous()},
                          str(staging / "evaluation_pairs.safetensors"))
            network.save_pretrained(staging / "network", model_card_kwargs={"training": report.get("training", {})})
            table.save(staging / "scores")
            atomic_write_json(staging / "report.json", json_safe(report))
        return folder

    @staticmethod
    def network_path(path: str | Path) -> Path:
        """Where the network of `path` is: its network/ when `path` is a fit folder, else `path` itself (a folder
        saved with InfluenceNetwork.save_pretrained)."""
        path = Path(path)
        return path / "network" if (path / "network").is_dir() else path

    def network(self) -> InfluenceNetwork:
        return InfluenceNetwork.from_pretrained(str(self.network_path(self.path)))

    def report(self) -> dict:
        """The fit's report; {} for a plain saved network folder."""
        file = self.path / "report.json"
        return json.loads(file.read_text()) if file.exists() else {}

    def evaluation_pairs(self) -> tuple[Tensor, Tensor] | None:
        """(predicted [p], true [p]) of the evaluated pairs, or None when the fit evaluated none."""
        file = self.path / "evaluation_pairs.safetensors"
        if not file.exists():
            return None
        pairs = load_file(str(file))
        return pairs["predicted"], pairs["true"]
