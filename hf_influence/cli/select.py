"""`hf-influence demo` and `hf-influence select`: select rows, write selected.jsonl, the score table and a
report (shares of a pool column in the selection against the pool, stage seconds, landmark diagnostics)."""

from __future__ import annotations

import collections
import contextlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset

from ..demo import demo_pool, demo_target
from ..influence import select_by_influence
from ..models import model_identity
from ..methods.influence_distillation_config import InfluenceDistillationConfig
from ..options import SHARED_CONFIG_TYPES, SelectionConfig
from ..artifacts.scores import ScoreTable, is_replaceable_table_folder
from ..extraction.store import atomic_write_bytes, atomic_write_json, folder_replacement
from .arguments import (DemoArguments, ModelArguments, SelectArguments, load_cli_model, load_pool_and_target, parse,
                        parse_budget, selection_types)


def group_shares(rows: Dataset, column: str, depth: int | None = None) -> dict[str, float]:
    """{group: share of rows} for the values of `column`; depth keeps the first `depth` "/"-separated parts of a
    value (sources such as "t0/adversarial_qa_..." group into "t0" at depth 1), None the whole value."""
    if column not in rows.column_names or len(rows) == 0:
        return {}
    values = ["/".join(str(value).split("/")[:depth]) for value in rows[column]]
    counts = collections.Counter(values)
    return {value: counts[value] / len(values) for value in sorted(counts)}


def selection_options(configs: tuple) -> dict:
    """The fields of the parsed config dataclasses as select_by_influence keyword options."""
    return {name: value for config in configs for name, value in asdict(config).items()}


# What select, predict and demo write into --output (an earlier run's are replaced, nothing else is touched).
SELECTION_OUTPUTS = ("selected.jsonl", "scores", "report.json")


def check_output(output: Path, outputs: tuple[str, ...] = SELECTION_OUTPUTS, work_dir: str | None = None) -> None:
    """Before any work: --output must be a folder this command can write, holding nothing but an earlier run's
    `outputs` (a scores/ that is a score table), and not holding --work_dir. Ends the command with a one-line
    message. The folder is then written as one (`store.folder_replacement`): an earlier run's result stays whole
    until the new one is, and the folder's old content goes."""
    if work_dir is not None and Path(work_dir).resolve().is_relative_to(output.resolve()):
        raise SystemExit(f"--work_dir {work_dir} is inside --output {output}, which is replaced as a whole when the "
                         f"run ends: put the work_dir beside it.")
    if output.exists() and not output.is_dir():
        raise SystemExit(f"--output {output} is a file: pass a folder (new, or an earlier run's).")
    if output.is_dir():
        foreign = sorted(path.name for path in output.iterdir() if path.name not in outputs)
        if foreign:
            raise SystemExit(f"--output {output} holds files this command does not write ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}): pass a new folder or an earlier run's.")
        scores = output / "scores"
        if scores.exists() and not is_replaceable_table_folder(scores):  # what ScoreTable.save would refuse
            raise SystemExit(f"{scores} exists and is not a score table: move it, or pass another --output.")
    check_writable_folder(output, "--output")


def check_writable_folder(folder: Path, flag: str) -> None:
    """Before any work: `folder` takes new files (the folders it needs are created for the check and removed
    again, so that a command refused later leaves nothing behind). Ends the command with a one-line message
    naming `flag` otherwise."""
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{flag} {folder} is a file: pass a folder.")
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SystemExit(f"{flag} {folder} cannot be written: {error}") from None
    finally:
        for path in missing:  # innermost first; only the folders this check made, still empty
            with contextlib.suppress(OSError):
                path.rmdir()


def write_selection(output: Path, selected: Dataset, table: ScoreTable | None, report: dict) -> None:
    """selected.jsonl, scores/ (unless table is None) and report.json as the new content of output, replacing an
    earlier run's only once all three are written."""
    with folder_replacement(output) as staging:
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in selected)
        atomic_write_bytes(staging / "selected.jsonl", lines.encode())
        if table is not None:
            table.save(staging / "scores")
        atomic_write_json(staging / "report.json", report)


def print_report(report: dict, top: int | None = 20) -> None:
    """The run's summary; the group table lists the `top` groups by selected share (None: all) and sums the rest
    in one line, so a pool of hundreds of sources still prints a screenful (report.json keeps every group)."""
    seconds = report["seconds"]
    print(f"\n{report['method']}: selected {report['selected_rows']} of {report['pool_rows']} pool rows "
          f"for {report['target_rows']} target rows in {seconds.get('total', 0.0):.1f} s")
    stages = [f"{stage} {value:.1f} s" for stage, value in seconds.items() if stage != "total"]
    if stages:  # random records none
        print("  stages: " + ", ".join(stages))
    if "landmarks" in report:
        landmarks = report["landmarks"]
        bandwidth = ("" if landmarks["bandwidth_scale"] is None
                     else f"bandwidth {landmarks['bandwidth_scale']:g} x the median distance, ")
        spearman = "undefined" if landmarks["loo_spearman"] is None else f"{landmarks['loo_spearman']:.2f}"
        print(f"  landmarks: {landmarks['num_landmarks']} ({landmarks['landmark_share_pool']:.1%} of the pool, "
              f"{landmarks['landmark_share_selected']:.1%} of the selection); leave-one-out Spearman "
              f"{spearman}; {bandwidth}ridge {landmarks['ridge']:g}")
    if "exact_gradients" in report:
        cost = report["exact_gradients"]
        measured = ("" if cost["measured_speedup_vs_exact"] is None
                    else f", measured {cost['measured_speedup_vs_exact']:.1f}x")
        print(f"  decided by: {cost['decided_by']}; exact gradients for {cost['exact_gradient_rows']} rows "
              f"({cost['exact_gradient_share']:.1%} of the pool); pool side vs exact influence: predicted "
              f"{cost['predicted_speedup_vs_exact']:.1f}x cheaper{measured}")
    if report["selected_share"]:
        selected = report["selected_share"]
        groups = sorted(report["pool_share"].items(), key=lambda item: (-selected.get(item[0], 0.0), item[0]))
        shown, rest = groups[:top] if top is not None else groups, groups[top:] if top is not None else []
        print(f"\n  {'group':<40}{'pool share':>12}{'selected share':>16}{'ratio':>8}")
        for group, share in shown:
            print(f"  {group:<40}{share:>12.3f}{selected.get(group, 0.0):>16.3f}{selected.get(group, 0.0) / share:>8.2f}")
        if rest:
            pool_rest = sum(share for _, share in rest)
            selected_rest = sum(selected.get(group, 0.0) for group, _ in rest)
            print(f"  {f'({len(rest)} other groups)':<40}{pool_rest:>12.3f}{selected_rest:>16.3f}"
                  f"{selected_rest / pool_rest:>8.2f}")


def select_and_report(pool: Dataset, target: Dataset, model, tokenizer, budget, options: dict, group_column: str,
                       save_scores: bool = True, group_depth: int | None = None):
    if save_scores:
        selected, table = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=budget,
                                              return_scores=True, **options)
        method, model_id, seconds = (table.provenance["method"], table.provenance["model_id"],
                                     table.provenance["details"].get("seconds", {}))
        landmarks = table.provenance["details"].get("landmarks")
        cost = table.provenance["details"].get("exact_gradients")
    else:  # streamed: no table; the run's details come back beside the rows
        selected, details = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=budget,
                                                return_details=True, **options)
        table, method, seconds = None, options["method"], details["seconds"]
        model_id, landmarks, cost = model_identity(model)[0], details.get("landmarks"), details.get("exact_gradients")
    report = {
        "method": method, "model_id": model_id,
        "pool_rows": len(pool), "target_rows": len(target), "selected_rows": len(selected),
        "seconds": seconds,
        "group_column": group_column, "group_depth": group_depth,
        "pool_share": group_shares(pool, group_column, group_depth),
        "selected_share": group_shares(selected, group_column, group_depth),
    }
    if landmarks is not None:
        report["landmarks"] = landmarks
    if cost is not None:
        report["exact_gradients"] = cost
    return selected, table, report


def run_demo(argv: list[str]) -> dict:
    """Main job: Influence Distillation vs random on a generated multi-domain pool for a math target."""
    types, refusal = selection_types(argv)
    demo, model_args, *configs = parse(
        argv, (DemoArguments, ModelArguments, *types),
        "Select training rows for a math target from a generated multi-domain pool (math, code, extractive QA, "
        "classification) with Influence Distillation on the embedded default model, and compare with random.",
        command="demo", refusal=refusal,
    )
    options = selection_options(configs)
    # Random reads the shared options only (the chosen method's own would be refused as another method's).
    shared = selection_options([config for config in configs if type(config) in SHARED_CONFIG_TYPES])
    if options.get("num_landmarks") == InfluenceDistillationConfig.num_landmarks:  # not set: a quarter of the
        options["num_landmarks"] = demo.rows_per_domain  # pool, to show the regression at work
    if options["response_column"] is None:
        options["response_column"] = "solution"  # the math target's worked answer (pool rows are chat rows)
    model, tokenizer = load_cli_model(model_args, options.pop("model_init_kwargs"))
    shared.pop("model_init_kwargs")
    pool = demo_pool(demo.rows_per_domain, seed=demo.data_seed)
    target = demo_target("math", demo.target_rows, seed=demo.data_seed + 1)
    output = Path(demo.output)
    summary = {}
    budget = parse_budget(demo.demo_budget, "--demo_budget")
    for method, run_options in ((options["method"], options), ("random", {**shared, "method": "random"})):
        selected, table, report = select_and_report(pool, target, model, tokenizer, budget, run_options, "source")
        write_selection(output / method, selected, table, report)
        print_report(report)
        summary[method] = {"in_domain_share": report["selected_share"].get("demo/math", 0.0),
                           "seconds": report["seconds"].get("total")}
    print(f"\nShare of the selection from the target's domain (demo/math; pool share "
          f"{group_shares(pool, 'source')['demo/math']:.2f}):")
    for method, row in summary.items():
        print(f"  {method:<28}{row['in_domain_share']:.2f}")
    atomic_write_json(output / "summary.json", summary)
    print(f"\nSelections, score tables and reports in {output}/")
    return summary


def run_select(argv: list[str]) -> dict:
    """Select --budget rows of --pool for --target; write selected.jsonl, the score table and a report."""
    types, refusal = selection_types(argv)
    args, model_args, *configs = parse(
        argv, (SelectArguments, ModelArguments, *types),
        "Select the pool rows that help most on the target (Influence Distillation by default; --method for "
        "influence_distillation_exact, less, rds, nn_cift, random). --help with --method NAME lists that method's "
        "own options.",
        command="select", refusal=refusal,
    )
    # Everything that can be checked without a model pass is, first: nothing is lost to a late refusal.
    budget = parse_budget(args.budget)
    selection_config = next(config for config in configs if isinstance(config, SelectionConfig))
    check_output(Path(args.output), work_dir=selection_config.work_dir)
    pool, target = load_pool_and_target(args)
    options = selection_options(configs)
    # The command loads the model itself, with these options too: the run then gets the loaded model.
    model, tokenizer = load_cli_model(model_args, options.pop("model_init_kwargs"))
    selected, table, report = select_and_report(pool, target, model, tokenizer, budget, options,
                                                 args.group_column, args.save_scores, args.group_depth)
    write_selection(Path(args.output), selected, table, report)
    print_report(report, args.top)
    print(f"\nselected.jsonl, {'scores/ ' if table is not None else ''}and report.json in {args.output}/")
    return report
