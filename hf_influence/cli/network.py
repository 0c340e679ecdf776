"""`hf-influence fit-network`, `predict` and `push`: NN-CIFT's InfluenceNetworks and score tables on the command
line."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

from ..artifacts.fit_folder import FitFolder
from ..artifacts.hub import push_influence_network, push_score_table
from ..methods.nn_cift import oracle_options
from ..networks.nn_cift_pipeline import nn_cift
from ..options import NNCIFTConfig, SelectionConfig
from ..networks.pretrained import load_network, network_summary, select_with_network, unseen_quadrant
from ..registry import ORACLES
from ..artifacts.scores import ScoreTable
from .arguments import (
    HubArguments,
    ModelArguments,
    SelectArguments,
    load_cli_model,
    load_pool_and_target,
    parse,
    parse_budget,
    selection_types,
)
from .select import check_output, group_shares, print_report, write_selection


def run_fit_network(argv: list[str]) -> dict:
    """NN-CIFT: the oracle on a block, an InfluenceNetwork fitted on it; writes network/, scores/, report.json."""
    types, refusal = selection_types(argv, method="nn_cift")
    args, model_args, *configs = parse(
        argv, (SelectArguments, ModelArguments, *types),
        "Distil an influence oracle (--oracle) into an InfluenceNetwork from a u-block (--block_fraction) of "
        "--pool x --target, predict every pair, and save the network, the score table and a report.",
        command="fit-network", refusal=refusal,
    )
    output = Path(args.output)
    work_dir = next(config for config in configs if isinstance(config, SelectionConfig)).work_dir
    check_output(output, FitFolder.OUTPUTS, work_dir)  # before the oracle's work, which a late refusal would lose
    pool, target = load_pool_and_target(args)
    nn_config = next(config for config in configs if isinstance(config, NNCIFTConfig))
    needs_model = ORACLES[nn_config.oracle].requires_model(nn_config)
    options = oracle_options({type(config): config for config in configs})
    # The command loads the model itself, with these options too: the oracle then gets the loaded model.
    init = options.pop("model_init_kwargs")
    model, tokenizer = load_cli_model(model_args, init) if needs_model else (None, None)
    result = nn_cift(pool, target, nn_config, model=model, tokenizer=tokenizer,
                     show_progress=options.pop("show_progress"), **options)
    training = {"block_rows": len(result.block_rows), "block_columns": len(result.block_columns),
                "block_fraction": nn_config.block_fraction}
    report = {"oracle": nn_config.oracle, "pool_rows": len(pool), "target_rows": len(target), "training": training,
              "seconds": result.seconds, "evaluation": result.evaluation}
    # The card beside the weights, with the plot of the evaluated pairs, as on the Hub; `push` reads the pairs.
    FitFolder.write(output, result.network, result.score_table(pool, target, nn_config, details=report), report,
                    result.evaluation_pairs)
    print(f"\nInfluenceNetwork ({nn_config.oracle}) fitted on a {training['block_rows']} x {training['block_columns']} "
          f"block of {len(pool)} x {len(target)}: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    for name, quadrant in (result.evaluation or {}).items():
        if name.startswith("Q"):
            print(f"  {name}: MSE {quadrant['mse']:.4f} (mean baseline {quadrant['mean_baseline_mse']:.4f}), "
                  f"Spearman {quadrant['spearman']:.3f}")
    print(f"network/, scores/ and report.json in {output}/")
    return report


# The SelectionConfig options predict reads; every other one (a method, landmarks, a work_dir) would be ignored.
PREDICT_SELECTION_OPTIONS = ("selection", "selection_seed", "target_task_column", "show_progress")


def run_predict(argv: list[str]) -> dict:
    """Score --pool x --target with an InfluenceNetwork and select --budget rows (`select_with_network`); prints
    what the network was measured to do on unseen rows and targets; writes selected.jsonl, scores/, report.json."""
    hub_args, args, selection = parse(
        argv, (HubArguments, SelectArguments, SelectionConfig),
        "Predict influence for every (pool, target) pair with a saved or Hub InfluenceNetwork, using the "
        "encoder it was trained with, and select --budget rows (by default with the rule of the network's oracle).",
        command="predict", used={"network", *(f.name for f in fields(SelectArguments)), *PREDICT_SELECTION_OPTIONS},
    )
    if not hub_args.network:
        raise SystemExit("--network is required: an InfluenceNetwork folder or Hub repo id.")
    budget = parse_budget(args.budget)  # a bad --budget or --output ends here, before anything is loaded
    check_output(Path(args.output))
    pool, target = load_pool_and_target(args)
    network = load_network(hub_args.network)
    print(network_summary(network))
    start = time.perf_counter()
    selected, table = select_with_network(pool, target, network, budget, selection=selection.selection,
                                          selection_seed=selection.selection_seed,
                                          target_task_column=selection.target_task_column,
                                          show_progress=selection.show_progress, return_scores=True)
    seconds = time.perf_counter() - start
    report = {"method": "nn_cift_predict", "model_id": hub_args.network, "pool_rows": len(pool),
              "target_rows": len(target), "selected_rows": len(selected), "seconds": {"total": seconds},
              "selection": table.provenance["selection"], "network_q4": (unseen_quadrant(network) or (None, None))[1],
              "group_column": args.group_column, "group_depth": args.group_depth,
              "pool_share": group_shares(pool, args.group_column, args.group_depth),
              "selected_share": group_shares(selected, args.group_column, args.group_depth)}
    write_selection(Path(args.output), selected, table, report)
    print_report(report, args.top)
    return report


def run_push(argv: list[str]) -> str:
    """Push an InfluenceNetwork (--network, a fit-network folder) or a score table (--scores) to --repo_id."""
    (hub_args,) = parse(argv, (HubArguments,), "Push an InfluenceNetwork (with its card and plot) or a score "
                                                "table (as a dataset repo config) to the Hugging Face Hub.",
                        command="push")
    if not hub_args.repo_id or not (hub_args.network or hub_args.scores):
        raise SystemExit("push needs --repo_id and one of --network (a fit-network folder) or --scores.")
    if hub_args.scores:
        url = push_score_table(ScoreTable.load(hub_args.scores), hub_args.repo_id, config_name=hub_args.config_name,
                               private=hub_args.private, license=hub_args.license)
    else:
        folder = Path(hub_args.network)
        if not folder.is_dir():
            raise FileNotFoundError(f"--network {hub_args.network!r} is not a folder (push takes a fit-network output "
                                    "or a saved InfluenceNetwork folder).")
        fit = FitFolder(folder)
        report = fit.report()
        url = push_influence_network(fit.network(), hub_args.repo_id, training=report.get("training", {}),
                                     evaluation=report.get("evaluation"), plot=fit.evaluation_pairs(),
                                     private=hub_args.private, license=hub_args.license)
    print(f"pushed to {url}")
    return url
