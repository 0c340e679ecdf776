"""The landmark fidelity lab: how faithful landmark Influence Distillation is to exact influence, and why.

    python benchmarks/landmark_fidelity.py --cache runs/fidelity --json benchmarks/results/landmark_fidelity_cpu.json

Pool side, computed once into --cache by fidelity_cache.py (resumable; a rerun reuses it): a seeded slice of
../shared/data/pool.jsonl.gz (default 2,048 rows, max_length 256), SmolLM2-135M-Instruct offline, the library's
warm-up, the exact preconditioned LoRA gradient of *every* pool row, the gradients of three targets (GSM8K test,
MMLU dev, BBH; 32 rows each), JVP embeddings of each variant, RDS+ and MiniLM embeddings. Then every
configuration is evaluated from the cache in seconds: a landmark run takes its landmark gradients as rows of the
exact store, so landmark and exact influence differ only by the regression.

Per configuration (features, k, landmark selection, kernel, bandwidth / ridge, how landmark rows are scored,
the shortlist of rows scored exactly after the regression, selection rule) and target, averaged over --seeds
landmark draws:
- spearman: Spearman of the per-row mean score (over the target rows) against exact influence's;
- topk_jaccard: Jaccard of the top 5% rows by mean score against exact's top 5%;
- selection_jaccard: Jaccard of the rule's selection (5% budget) against the same rule on exact scores;
- landmark_share_selected / landmark_share_pool: landmarks among the selected rows, against their pool share;
- in_domain_share: GSM8K only, the share of `flan_cot/gsm8k` and `flan_cot/aqua` rows in the selection (MMLU and
  BBH have no honest source-label definition in this pool: reported as null);
- loo_spearman: the library's own diagnostic (leave-one-out on the landmarks, no extra model pass);
- gradient_cosine: the paper's diagnostic, the cosine between the kernel-regressed gradient (transfer matrix
  applied to the landmark gradients) and the true gradient of non-landmark rows (main grid, k = 128).
Per feature and target, `ceilings`: the Spearman of leave-one-out predictions with every other pool row as a
landmark, the most the features can give at any k.

References: exact ID, RDS+ and MiniLM cosine, random (the pool's base rate), each under both rules; with the
down_proj gradient variant cached, the same for its exact influence (the gradient-signal comparison).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import scipy.stats
import torch
from datasets.utils.logging import disable_progress_bar
from fidelity_cache import GRADIENTS, JVP_VARIANTS, LM_STATES, PROXY_GRADIENTS, TARGETS, build_cache
from machine_info import cpu_model
from safetensors.torch import load_file

from hf_influence.data import load_rows
from hf_influence.selection.landmarks import LandmarkRegressor, concatenate_scaled, select_landmarks
from hf_influence.registry import METHODS
from hf_influence.methods.influence_distillation import exact_gradient_plan, landmark_diagnostics
from hf_influence.methods.influence_distillation_config import InfluenceDistillationConfig
from hf_influence.selection.rules import select_indices
from hf_influence.extraction.store import VectorStore

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_DOMAIN = {"gsm8k": ("flan_cot/gsm8k", "flan_cot/aqua"), "mmlu": None, "bbh": None}
FEATURES = ("jvp", "jvp_reference", "jvp_response_mean", "jvp8", "lm", "minilm", "jvp+lm", "jvp+minilm",
            *LM_STATES, *PROXY_GRADIENTS, *(f"{name}@scores" for name in PROXY_GRADIENTS))
# "NAME@scores": the proxy gradients' inner products with the target rows' proxy gradients ([n, m], one column per
# target row), a "proxy influence" the regression then maps to exact influence; "NAME": the proxy vectors themselves.
# Feature names as InfluenceDistillationConfig.landmark_features spells them ("lm": the RDS+ embeddings, cached as rds_*).
CACHE_NAMES = {"lm": "rds"}
LANDMARK_COUNTS = (32, 64, 128, 256, 512)
BOUNDS = (0.10, 0.14, 0.25)  # exact_gradient_fraction values evaluated (0.14: the library's default)
BUDGETS = (0.05, 0.10)
# The frontier's plot: the default, the cheapest gradient, the best, RDS+'s embeddings, the cheapest of all.
PLOTTED_FEATURES = ("jvp", "trunc4", "tail1", "lm", "lm8_last")
RULES = ("round_robin", "mean_top_k")
BUDGET_FRACTION = 0.05


class Lab:
    """The cached pool side as tensors, and the evaluation of one configuration on it."""

    def __init__(self, cache: Path, data_dir: Path, seed: int, gradient: str = "lora"):
        self.cache = cache
        jvp = VectorStore.open(cache / "jvp")
        row_ids = jvp.row_ids.tolist()
        info = json.loads((cache / "data.json").read_text())
        raw = load_rows(data_dir / "pool.jsonl.gz").shuffle(seed=seed).select(range(info["pool_rows"]))
        self.sources = [raw[row]["source"] for row in row_ids]
        self.n = len(row_ids)
        self.budget = max(1, round(BUDGET_FRACTION * self.n))
        self.proxies = {name: self._proxy(name) for name in PROXY_GRADIENTS if self._has_proxy(name)}
        self.features = {name: self._features(name) for name in FEATURES if "@" not in name and self._has_features(name)}
        self.features.update({name: None for name in FEATURES if "@" in name and name.split("@")[0] in self.proxies})
        costs = cache / "costs.json"
        self.costs = json.loads(costs.read_text())["fraction_of_gradient"] if costs.exists() else {}
        if "jvp" not in self.features:
            raise FileNotFoundError(f"{cache / 'jvp'} is missing or incomplete: build the cache first")
        self.gradients = {kind: self._gradients(kind) for kind in GRADIENTS if self._has_gradients(kind)}

    def _has_proxy(self, name: str) -> bool:
        folders = [name] + [f"{name}_target-{t}" for t in TARGETS]
        return all((self.cache / f).exists() and VectorStore.open(self.cache / f).is_complete() for f in folders)

    def _proxy(self, name: str) -> dict:
        """A PROXY_GRADIENTS feature: pool vectors [n, d'] and per target its rows' vectors [m, d']."""
        return {"pool": VectorStore.open(self.cache / name).to_tensor().double(),
                "targets": {t: VectorStore.open(self.cache / f"{name}_target-{t}").to_tensor().double() for t in TARGETS}}

    def feature(self, name: str, target: str) -> torch.Tensor:
        """[n, e] float64 regression features of every pool row for this target."""
        if name.endswith("@scores"):
            proxy = self.proxies[name.split("@")[0]]
            return proxy["pool"] @ proxy["targets"][target].T
        return self.features[name]

    def cost(self, name: str) -> float | None:
        """Seconds per pool row of a feature / of an exact gradient row (costs.json); a concatenation adds its parts."""
        parts = [part.split("@")[0] for part in name.split("+")]
        return sum(self.costs[part] for part in parts) if all(part in self.costs for part in parts) else None

    def proxy_spearman(self, name: str, target: str) -> float:
        """Spearman of the mean proxy influence (no regression) against exact influence's per-row mean."""
        exact = self.gradients["lora"]["exact"][target]
        return float(scipy.stats.spearmanr(self.feature(f"{name}@scores", target).mean(1).numpy(),
                                           exact.mean(1).numpy()).statistic)

    def _has_features(self, name: str) -> bool:
        parts = name.split("+")
        return all((self.cache / part).exists() and VectorStore.open(self.cache / part).is_complete()
                   if part in JVP_VARIANTS or part in PROXY_GRADIENTS else (self.cache / f"{CACHE_NAMES.get(part, part)}_pool.safetensors").exists()
                   for part in parts)

    def _features(self, name: str) -> torch.Tensor:
        """[n, e] float64; a concatenation is scaled part by part as the library does (`concatenate_scaled`)."""
        parts = []
        for part in name.split("+"):
            if part in self.proxies:
                values = self.proxies[part]["pool"]
            elif part in JVP_VARIANTS:
                values = VectorStore.open(self.cache / part).to_tensor().double()
            else:
                values = load_file(str(self.cache / f"{CACHE_NAMES.get(part, part)}_pool.safetensors"))["embeddings"].double()
            parts.append(values)
        return parts[0] if len(parts) == 1 else concatenate_scaled(parts)

    def _has_gradients(self, kind: str) -> bool:
        folders = [f"pool_gradients-{kind}"] + [f"target_gradients-{kind}-{t}" for t in TARGETS]
        return all((self.cache / f).exists() and VectorStore.open(self.cache / f).is_complete() for f in folders)

    def _gradients(self, kind: str) -> dict:
        pool = VectorStore.open(self.cache / f"pool_gradients-{kind}").to_tensor()
        targets = {t: VectorStore.open(self.cache / f"target_gradients-{kind}-{t}").to_tensor() for t in TARGETS}
        return {"pool": pool, "exact": {t: (pool @ g.T).double() for t, g in targets.items()}}

    def in_domain_share(self, target: str, rows: torch.Tensor) -> float | None:
        sources = IN_DOMAIN[target]
        if sources is None:
            return None
        return sum(self.sources[r].startswith(sources) for r in rows.tolist()) / len(rows)

    def reference(self, target: str, scores: torch.Tensor) -> dict:
        """In-domain share (GSM8K) of the selection (5% of the score matrix's rows: the first rows of the pool)
        under each rule."""
        budget = max(1, round(BUDGET_FRACTION * scores.shape[0]))
        return {rule: self.in_domain_share(target, select_indices(scores.float(), budget, rule=rule))
                for rule in RULES}

    def evaluate(self, target: str, features: str, k: int, seed: int, landmark_selection: str = "uniform",
                 kernel: str = "rbf", bandwidth: float | None = None, ridge: float | None = None,
                 landmark_scores: str = "loo", gradient_cosine: bool = False, shortlist: int = 0,
                 budget_fraction: float = BUDGET_FRACTION) -> dict:
        """Metrics of one landmark configuration on one target, per selection rule, selecting budget_fraction of
        the pool. With shortlist > 0, as the library does: the rule shortlists that many rows from the scores
        above, and those rows are then scored exactly (their gradients are rows of the exact store), landmarks
        outside the shortlist keep their leave-one-out scores ("loo") or their exact ones ("exact"); spearman and
        topk_jaccard are then per rule, on the final scores. cost_fraction: the pool side's cost against exact
        influence's, the feature's measured cost plus the rows with an exact gradient over n."""
        exact = self.gradients["lora"]["exact"][target]
        embeddings = self.feature(features, target)
        landmarks = select_landmarks(self.n, k, landmark_selection, embeddings=embeddings.float(), seed=seed)
        regressor = LandmarkRegressor().fit(embeddings[landmarks], exact[landmarks], kernel=kernel, ridge=ridge,
                                            bandwidth=bandwidth, seed=seed)
        scores = regressor.predict(embeddings)
        scores[landmarks] = regressor.loo if landmark_scores == "loo" else exact[landmarks]
        diagnostics = landmark_diagnostics(regressor, exact[landmarks], self.n, landmark_scores == "loo")
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[landmarks] = True
        means, exact_means = scores.mean(1), exact.mean(1)
        top = max(1, round(budget_fraction * self.n))
        result = {
            "spearman": float(scipy.stats.spearmanr(means.numpy(), exact_means.numpy()).statistic),
            "topk_jaccard": _jaccard(means.topk(top).indices, exact_means.topk(top).indices),
            "landmark_share_pool": k / self.n, "loo_spearman": diagnostics["loo_spearman"],
            "bandwidth_scale": regressor.bandwidth, "ridge": regressor.ridge,
        }
        for rule in RULES:
            final, extra = scores, {}
            exact_rows = k
            if shortlist:
                chosen_rows = select_indices(scores.float(), shortlist, rule=rule, seed=seed)
                final = scores.clone()
                final[chosen_rows] = exact[chosen_rows]
                exact_rows = int((mask | torch.isin(torch.arange(self.n), chosen_rows)).sum())
                extra = {"spearman": float(scipy.stats.spearmanr(final.mean(1).numpy(), exact_means.numpy()).statistic),
                         "topk_jaccard": _jaccard(final.mean(1).topk(top).indices, exact_means.topk(top).indices)}
            cost = self.cost(features)
            extra.update(exact_rows=exact_rows, cost_fraction=None if cost is None else cost + exact_rows / self.n)
            chosen = select_indices(final.float(), top, rule=rule, seed=seed)
            reference = select_indices(exact.float(), top, rule=rule, seed=seed)
            result[rule] = {"selection_jaccard": _jaccard(chosen, reference),
                            "landmark_share_selected": float(mask[chosen].float().mean()),
                            "in_domain_share": self.in_domain_share(target, chosen), **extra}
        if gradient_cosine:
            pool = self.gradients["lora"]["pool"].double()
            predicted = regressor.transfer_matrix(embeddings[~mask]) @ pool[landmarks]
            result["gradient_cosine"] = float(torch.nn.functional.cosine_similarity(predicted, pool[~mask]).mean())
        return result


    def uniform_exact(self, target: str, rows: int, budget_fraction: float, seed: int, rule: str) -> dict:
        """The cost-matched control: exact influence on `rows` uniformly drawn pool rows only (as many exact
        gradients as a bounded run takes, no features), the rule selecting from them."""
        exact = self.gradients["lora"]["exact"][target]
        top = max(1, round(budget_fraction * self.n))
        drawn = select_landmarks(self.n, rows, "uniform", seed=seed)
        chosen = drawn[select_indices(exact[drawn].float(), top, rule=rule, seed=seed)]
        reference = select_indices(exact.float(), top, rule=rule, seed=seed)
        return {"selection_jaccard": _jaccard(chosen, reference), "in_domain_share": self.in_domain_share(target, chosen),
                "exact_rows": rows, "cost_fraction": rows / self.n}

    def ceiling(self, target: str, features: str) -> float:
        """Spearman of the leave-one-out predictions with every other pool row as a landmark (k = n): the most a
        regression on these features can recover of exact influence's per-row ranking, at any k."""
        exact = self.gradients["lora"]["exact"][target]
        regressor = LandmarkRegressor().fit(self.feature(features, target), exact)
        return float(scipy.stats.spearmanr(regressor.loo.mean(1).numpy(), exact.mean(1).numpy()).statistic)


def bounded_name(features: str, fraction: float, budget: float, scores: str) -> str:
    return f"bounded/{features}/f{fraction:g}/b{budget:g}/{scores}-landmarks"


def bounded_options(lab: Lab, features: str, fraction: float, budget: float, scores: str) -> dict:
    """`evaluate` options of the library's cost-bounded path: landmarks and shortlist from exact_gradient_plan."""
    config = InfluenceDistillationConfig(exact_gradient_fraction=fraction, landmark_scores=scores)
    plan = exact_gradient_plan(config, lab.n, max(1, round(budget * lab.n)))
    return {"features": features, "k": plan.landmarks, "shortlist": plan.shortlist, "landmark_scores": scores,
            "bandwidth": config.kernel_bandwidth, "ridge": config.kernel_ridge}


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / len(a | b)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_dicts(results: list[dict]) -> dict:
    return {key: _mean([result[key] for result in results]) for key in results[0]}


def _flatten(result: dict, rule: str) -> dict:
    """One rule's view of an `evaluate` result: the keys the README table and the issue ask for."""
    flat = {key: value for key, value in result.items() if key not in RULES}
    flat.update(result[rule])
    return flat


def averaged(lab: Lab, seeds: list[int], **config) -> dict:
    """{target: {rule: metrics averaged over seeds}} plus "mean" over targets, for one configuration."""
    per_target = {}
    for target in TARGETS:
        runs = [lab.evaluate(target, seed=seed, **config) for seed in seeds]
        per_target[target] = {rule: {key: _mean([_flatten(run, rule)[key] for run in runs])
                                     for key in _flatten(runs[0], rule)} for rule in RULES}
    per_target["mean"] = {rule: {key: _mean([per_target[t][rule][key] for t in TARGETS])
                                 for key in per_target[next(iter(TARGETS))][rule]} for rule in RULES}
    return per_target


def references(lab: Lab, data_dir_cache: Path) -> dict:
    """Exact influence of every cached gradient variant, RDS+, MiniLM cosine and random, per target."""
    out = {"random": {t: {rule: _base_rate(lab, t, lab.n) for rule in RULES} for t in TARGETS}}
    for kind, gradients in lab.gradients.items():
        rows = gradients["pool"].shape[0]
        if rows < lab.n:  # a variant on the first rows only: every reference again on those rows, side by side
            out[f"first_{rows}_rows"] = _subset_references(lab, rows, data_dir_cache)
            continue
        out[f"exact_{kind}"] = {t: lab.reference(t, gradients["exact"][t]) for t in TARGETS}
        selections = {t: select_indices(gradients["exact"][t].float(), lab.budget, rule="round_robin") for t in TARGETS}
        out[f"exact_{kind}"]["cross_target_jaccard"] = _mean(
            [_jaccard(selections[a], selections[b]) for a, b in itertools.combinations(TARGETS, 2)])
    for name, feature in (("rds", "lm"), ("minilm", "minilm")):
        if feature not in lab.features:
            continue
        pool = torch.nn.functional.normalize(lab.features[feature].float(), dim=1)
        out[name] = {}
        for t in TARGETS:
            target = load_file(str(data_dir_cache / f"{name}_target-{t}.safetensors"))["embeddings"] if (
                data_dir_cache / f"{name}_target-{t}.safetensors").exists() else None
            if target is not None:
                out[name][t] = lab.reference(t, pool @ torch.nn.functional.normalize(target.float(), dim=1).T)
    return out


def _base_rate(lab: Lab, target: str, rows: int) -> float | None:
    return lab.in_domain_share(target, torch.arange(rows))


def _subset_references(lab: Lab, rows: int, cache: Path) -> dict:
    """GSM8K in-domain shares of exact influence (each gradient variant), RDS+ and random on the first `rows`
    pool rows, 5% of them selected: the gradient-signal comparison when a variant covers only those rows."""
    out = {"random": _base_rate(lab, "gsm8k", rows)}
    for kind, gradients in lab.gradients.items():
        out[f"exact_{kind}"] = lab.reference("gsm8k", gradients["exact"]["gsm8k"][:rows])
    if "lm" in lab.features:
        pool = torch.nn.functional.normalize(lab.features["lm"][:rows].float(), dim=1)
        target = load_file(str(cache / "rds_target-gsm8k.safetensors"))["embeddings"].float()
        out["rds"] = lab.reference("gsm8k", pool @ torch.nn.functional.normalize(target, dim=1).T)
    return out


def print_frontier(summary: dict) -> None:
    """Markdown tables for README: each feature family's measured cost and k = n ceiling (and, for proxy
    gradients, the Spearman of the proxy influence itself), then the cost-bounded path and its controls."""
    costs = summary["feature_costs"]["fraction_of_gradient"]
    print("\n| features | cost / gradient row | ceiling GSM8K | MMLU | BBH | mean | proxy influence alone (GSM8K / MMLU / BBH) |")
    print("|---|---|---|---|---|---|---|")
    for name, ceilings in sorted(summary["ceilings"].items(), key=lambda item: (costs.get(item[0]) or 9, item[0])):
        cost = "" if costs.get(name) is None else f"{costs[name]:.2f}"
        proxy = summary["proxy_spearman"].get(name)
        direct = "" if proxy is None else " / ".join(f"{proxy[t]:.2f}" for t in TARGETS)
        print(f"| {name} | {cost} | " + " | ".join(f"{ceilings[t]:.3f}" for t in TARGETS)
              + f" | {_mean(list(ceilings.values())):.3f} | {direct} |")
    print("\n| cost-bounded path (round_robin, mean of 3 targets) | selection Jaccard | Spearman | top-5% Jaccard | "
          "cost / exact | landmarks selected / pool |")
    print("|---|---|---|---|---|---|")
    for name, result in summary["bounded"].items():
        mean = result["mean"]["round_robin"]
        print(f"| {name} | {mean['selection_jaccard']:.3f} | {mean['spearman']:.3f} | {mean['topk_jaccard']:.3f} | "
              f"{mean['cost_fraction']:.3f} | {mean['landmark_share_selected']:.3f} / {mean['landmark_share_pool']:.3f} |")
    for name, result in summary["cost_matched_controls"].items():
        mean = result["mean"]["round_robin"]
        print(f"| control: {name} | {mean['selection_jaccard']:.3f} | | | {mean['cost_fraction']:.3f} | |")


def plot_frontier(summary: dict, path: Path) -> None:
    """benchmarks/results/landmark_fidelity_frontier_cpu.png: each feature family's k = n ceiling (mean and per
    target) against its measured cost per row, and the cost-bounded default's selection Jaccard by bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = summary["feature_costs"]["fraction_of_gradient"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for name, ceilings in summary["ceilings"].items():
        if costs.get(name) is None:
            continue
        x = costs[name]
        left.scatter([x] * len(TARGETS), [ceilings[t] for t in TARGETS], s=12, color="grey", alpha=0.5)
        left.scatter([x], [_mean(list(ceilings.values()))], s=40)
        left.annotate(name, (x, _mean(list(ceilings.values()))), fontsize=8, xytext=(4, 2), textcoords="offset points")
    left.axhline(0.8, linestyle="--", color="red", linewidth=0.8)
    left.axvline(0.35, linestyle="--", color="red", linewidth=0.8)
    left.set_xlabel("feature cost per row / exact LoRA gradient row (measured)")
    left.set_ylabel("k = n leave-one-out Spearman vs exact ID (grey: per target)")
    left.set_title("Regression features: cost vs ceiling")
    shown = [f for f in PLOTTED_FEATURES if any(name.split("/")[1] == f for name in summary["bounded"])]
    for features, colour in zip(shown, ("C0", "C1", "C2", "C3", "C4")):
        for budget, style in zip(BUDGETS, ("-", "--")):
            points = sorted((result["mean"]["round_robin"]["cost_fraction"], result["mean"]["round_robin"]["selection_jaccard"])
                            for name, result in summary["bounded"].items()
                            if name.split("/")[1] == features and name.endswith("loo-landmarks") and f"/b{budget:g}/" in name)
            right.plot(*zip(*points), marker="o", linestyle=style, color=colour, label=f"{features}, budget {budget:.0%}")
    for budget, marker in zip(BUDGETS, ("x", "+")):
        points = sorted((result["mean"]["round_robin"]["cost_fraction"], result["mean"]["round_robin"]["selection_jaccard"])
                        for name, result in summary["cost_matched_controls"].items() if name.endswith(f"/b{budget:g}"))
        right.scatter(*zip(*points), marker=marker, color="black", label=f"uniform exact rows, budget {budget:.0%}")
    right.set_xlabel("pool-side cost / exact influence's (features + exact gradients)")
    right.set_ylabel("selection Jaccard vs exact ID (round-robin)")
    right.set_title("Cost-bounded path, exact_gradient_fraction 0.10 / 0.14 / 0.25")
    right.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def print_tables(summary: dict) -> None:
    """Markdown tables for README: the main grid (round-robin) and the references."""
    print("\n| configuration (round_robin) | spearman | top-5% Jaccard | selection Jaccard | landmarks selected / pool "
          "| GSM8K in-domain | LOO Spearman | gradient cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in summary["configs"].items():
        mean, gsm8k = result["mean"]["round_robin"], result["gsm8k"]["round_robin"]
        cosine = "" if mean.get("gradient_cosine") is None else f"{mean['gradient_cosine']:.3f}"
        print(f"| {name} | {mean['spearman']:.3f} | {mean['topk_jaccard']:.3f} | {mean['selection_jaccard']:.3f} | "
              f"{mean['landmark_share_selected']:.3f} / {mean['landmark_share_pool']:.3f} | "
              f"{gsm8k['in_domain_share']:.3f} | {mean['loo_spearman']:.3f} | {cosine} |")
    print("\n| reference | GSM8K in-domain (round_robin) | (mean_top_k) |")
    print("|---|---|---|")
    for name, result in summary["references"].items():
        if name.startswith("first_"):  # {reference: {rule: share}} on a subset of the pool
            for reference, shares in result.items():
                shares = shares if isinstance(shares, dict) else {rule: shares for rule in RULES}
                print(f"| {reference} ({name}) | {shares['round_robin']:.3f} | {shares['mean_top_k']:.3f} |")
        elif "gsm8k" in result:
            print(f"| {name} | {result['gsm8k']['round_robin']:.3f} | {result['gsm8k']['mean_top_k']:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="Folder of the cached pool side (resumable).")
    parser.add_argument("--json", type=Path, required=True, help="Where to write the results.")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--pool-rows", type=int, default=2048)
    parser.add_argument("--target-rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the pool slice and the target samples.")
    parser.add_argument("--seeds", default="0,1,2", help="Landmark draws averaged per configuration.")
    parser.add_argument("--gradients", default="lora,down_proj", help=f"Gradient variants to cache: {list(GRADIENTS)}.")
    parser.add_argument("--jvp", default=",".join(JVP_VARIANTS), help=f"JVP variants to cache: {list(JVP_VARIANTS)}.")
    parser.add_argument("--proxies", default=",".join(PROXY_GRADIENTS),
                        help=f"Proxy-gradient features to cache (and whose costs to measure): {list(PROXY_GRADIENTS)}.")
    parser.add_argument("--lm-states", default=",".join(LM_STATES),
                        help=f"Hidden-state features to cache (no derivative): {list(LM_STATES)}.")
    parser.add_argument("--variant-rows", type=int, default=None,
                        help="Compute gradient variants other than lora on the first N pool rows only (cheaper).")
    parser.add_argument("--features", default=",".join(FEATURES), help="Regression features to evaluate.")
    parser.add_argument("--landmarks", default=",".join(map(str, LANDMARK_COUNTS)), help="Landmark counts k.")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="Use what the cache holds (skip missing variants) instead of computing the rest.")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found (pass --data-dir)")
        return 0
    disable_progress_bar()
    logging.getLogger("hf_influence").setLevel(logging.ERROR)  # the lab reports fidelity itself
    started = time.perf_counter()
    if not args.evaluate_only:
        build_cache(args.cache, args.data_dir, args.pool_rows, args.target_rows, args.max_length, args.seed,
                    args.gradients.split(","), args.jvp.split(","), args.variant_rows,
                    tuple(p for p in args.proxies.split(",") if p), tuple(n for n in args.lm_states.split(",") if n))
    cache_seconds = time.perf_counter() - started
    lab = Lab(args.cache, args.data_dir, args.seed)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{lab.n} pool rows, budget {lab.budget}; features {list(lab.features)}; gradients {list(lab.gradients)}",
          flush=True)

    configs = {}
    counts = [k for k in map(int, args.landmarks.split(",")) if k < lab.n]
    features_list = [f for f in args.features.split(",") if f in lab.features]
    for features, k, scores in itertools.product(features_list, counts, ("loo", "exact")):
        name = f"{features}/k{k}/uniform/rbf/loo-tuned/{scores}-landmarks"
        configs[name] = averaged(lab, seeds, features=features, k=k, landmark_scores=scores,
                                 gradient_cosine=k == 128)
        mean = configs[name]["mean"]["round_robin"]
        print(f"{name:<55} spearman {mean['spearman']:.3f} jaccard {mean['topk_jaccard']:.3f} landmarks "
              f"{mean['landmark_share_selected']:.2f}/{mean['landmark_share_pool']:.2f} loo {mean['loo_spearman']:.3f}",
              flush=True)
    # Ablations at 16:1 on the JVP features: the old fixed bandwidth / ridge, kmeans++, the linear kernel.
    for features in ("jvp",):
        for label, options in {"median/ridge0.01": {"bandwidth": 1.0, "ridge": 0.01},
                               "kmeans++": {"landmark_selection": "kmeans++"}, "linear": {"kernel": "linear"}}.items():
            for scores in ("loo", "exact"):
                name = f"{features}/k128/{label}/{scores}-landmarks"
                configs[name] = averaged(lab, seeds, features=features, k=min(128, counts[-1]), landmark_scores=scores,
                                         **options)

    # The shortlist by factor at 16:1 and by k at factor 4 (median bandwidth, ridge 0.01 as the library's
    # defaults), every landmark scored exactly as 0.5 did, and with leave-one-out bandwidth and ridge.
    for k, factor, label, options in [(128, 2, "median/ridge0.01", {"bandwidth": 1.0, "ridge": 0.01}),
                                      (128, 3, "median/ridge0.01", {"bandwidth": 1.0, "ridge": 0.01}),
                                      *[(k, 4, "median/ridge0.01", {"bandwidth": 1.0, "ridge": 0.01}) for k in counts],
                                      (128, 4, "loo-tuned", {})]:
        if k in counts:
            name = f"jvp/k{k}/{label}/shortlist{factor:g}"
            configs[name] = averaged(lab, seeds, features="jvp", k=k, shortlist=round(factor * lab.budget),
                                     landmark_scores="exact", **options)
    # The cost-bounded library path (exact_gradient_plan: landmarks + shortlist <= fraction x n) per feature, bound
    # and budget, with the library's kernel settings; and its cost-matched control.
    bounded, controls = {}, {}
    for features, fraction, budget, scores in itertools.product(
            [f for f in features_list if lab.cost(f) is not None], BOUNDS, BUDGETS, ("loo", "exact")):
        name = bounded_name(features, fraction, budget, scores)
        bounded[name] = averaged(lab, seeds, budget_fraction=budget,
                                 **bounded_options(lab, features, fraction, budget, scores))
        mean = bounded[name]["mean"]["round_robin"]
        print(f"{name:<50} spearman {mean['spearman']:.3f} selection {mean['selection_jaccard']:.3f} cost "
              f"{mean['cost_fraction']:.3f} landmarks {mean['landmark_share_selected']:.2f}/"
              f"{mean['landmark_share_pool']:.2f}", flush=True)
    for fraction, budget in itertools.product(BOUNDS, BUDGETS):
        rows = math.floor(fraction * lab.n)
        control = {t: {rule: _mean_dicts([lab.uniform_exact(t, rows, budget, seed, rule) for seed in seeds])
                       for rule in RULES} for t in TARGETS}
        control["mean"] = {rule: _mean_dicts([control[t][rule] for t in TARGETS]) for rule in RULES}
        controls[f"uniform_exact/f{fraction:g}/b{budget:g}"] = control
    summary = {
        "config": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (offline copy)", "pool_rows": args.pool_rows,
                   "usable_rows": lab.n, "max_length": args.max_length, "targets": {t: args.target_rows for t in TARGETS},
                   "budget": lab.budget, "seeds": seeds, "slice_seed": args.seed, "in_domain_sources": IN_DOMAIN},
        "machine": {"platform": platform.platform(), "processor": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "cache_seconds": cache_seconds, "evaluation_seconds": time.perf_counter() - started - cache_seconds,
        "references": references(lab, args.cache),
        "ceilings": {features: {t: lab.ceiling(t, features) for t in TARGETS} for features in features_list},
        "proxy_spearman": {name: {t: lab.proxy_spearman(name, t) for t in TARGETS} for name in lab.proxies},
        "feature_costs": {"fraction_of_gradient": {f: lab.cost(f) for f in features_list},
                          "measured": json.loads((args.cache / "costs.json").read_text())
                          if (args.cache / "costs.json").exists() else None},
        "configs": configs, "bounded": bounded, "cost_matched_controls": controls,
    }
    # Configurations and ceilings of an earlier run with the same settings that this run did not evaluate (e.g.
    # other --features) are kept, so a partial rerun refreshes what it evaluates and loses nothing.
    if args.json.exists():
        earlier = json.loads(args.json.read_text())
        if earlier.get("config") == json.loads(json.dumps(summary["config"])):
            summary["configs"] = {**{name: result for name, result in earlier["configs"].items()
                                     if name not in configs}, **configs}
            summary["ceilings"] = {**earlier.get("ceilings", {}), **summary["ceilings"]}
    default = InfluenceDistillationConfig()
    rule = METHODS["influence_distillation"].default_selection
    summary["budgets"] = []
    for budget in BUDGETS:
        name = bounded_name(default.landmark_features, default.exact_gradient_fraction, budget, default.landmark_scores)
        if name in bounded:
            entry = {"name": name, "rule": rule, "budget": budget, **bounded[name]["mean"][rule],
                     "per_target": {t: bounded[name][t][rule] for t in TARGETS}}
            summary["budgets"].append(entry)
            if budget == BUDGET_FRACTION:
                summary["best"] = entry
    exact = summary["references"].get("exact_lora", {}).get("gsm8k", {})
    summary["exact"] = {"in_domain_share": exact.get("round_robin"), "in_domain_share_mean_top_k": exact.get("mean_top_k")}
    print_tables(summary)
    print_frontier(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plot_frontier(summary, args.json.with_name(args.json.stem + "_frontier.png"))
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
