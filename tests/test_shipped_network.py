"""The InfluenceNetwork shipped in the repository (pretrained/, fitted by benchmarks/nn_cift.py on the real pool):
its card states the figures the benchmark measured, it travels through the (loopback) Hub unchanged, and it selects
on new rows and a task it never saw without an oracle call."""

import json
from pathlib import Path

import hub_server
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from hf_influence import select_with_network
from hf_influence.demo import demo_pool, demo_target
from hf_influence.networks.network import InfluenceNetwork
from hf_influence.networks.oracles import Oracle

ROOT = Path(__file__).resolve().parents[1]
REPORT = json.loads((ROOT / "benchmarks" / "results" / "nn_cift_cpu.json").read_text())["pretrained"]
FOLDER = ROOT / REPORT["folder"]

local_hub = hub_server.local_hub


def test_the_shipped_network_carries_the_figures_its_benchmark_measured():
    network = InfluenceNetwork.from_pretrained(FOLDER)
    assert network.config["metrics"] == REPORT["metrics"]
    assert network.oracle == "influence_distillation_exact"
    assert network.valuation_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard.load(FOLDER / "README.md")
    q4 = REPORT["metrics"]["Q4"]
    assert f"| Q4 | {q4['rows']} x {q4['columns']} | {q4['mse']:.4f} | {q4['spearman']:.3f} |" in card.text
    assert card.data.license == "other" and "## Training data" in card.text
    # The held-out task is named as such and appears in none of the block's columns.
    assert REPORT["held_out_task"] not in REPORT["block_column_tasks"]
    assert f"{REPORT['held_out_task'].upper()}" in card.text.upper() and "held out of the fit" in card.text


@pytest.mark.slow
def test_the_shipped_network_travels_through_the_hub_and_selects_without_an_oracle(local_hub, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a pretrained network's selection called an oracle")

    monkeypatch.setattr(Oracle, "compute_block", refuse)
    repo_id = f"{local_hub.user}/nn-cift-id-smollm2-135m"
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=FOLDER)
    pulled = InfluenceNetwork.from_pretrained(repo_id)
    local = InfluenceNetwork.from_pretrained(FOLDER)
    assert pulled.config == local.config
    for (name, value), (_, expected) in zip(pulled.state_dict().items(), local.state_dict().items(), strict=True):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    # New rows, and targets of a task outside its fit.
    pool, target = demo_pool(6, seed=3), demo_target("qa", 4, seed=4)
    selected, table = select_with_network(pool, target, repo_id, budget=5, show_progress=False, return_scores=True)
    assert len(selected) == 5 and table.to_matrix()[0].shape == (len(pool), len(target))
