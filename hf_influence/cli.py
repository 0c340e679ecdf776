"""`hf-influence` command line: thin subcommands over the library's config dataclasses.

Each subcommand parses its dataclasses with `transformers.HfArgumentParser`, so every config field is a
flag (`--projection_dim 4096`) and `--config FILE.yaml` supplies defaults that flags override.

    hf-influence demo        select from a generated multi-domain pool for a math target (ID vs random)
    hf-influence select      select --budget rows of --pool for --target (any method)
    hf-influence fit-network distil an influence oracle into an InfluenceNetwork (NN-CIFT) on --pool x --target
    hf-influence predict     score --pool x --target with a saved or Hub InfluenceNetwork (and select --budget)
    hf-influence push        push an InfluenceNetwork (--network) or a score table (--scores) to the Hub
    hf-influence gradients   per-sample LoRA gradients of a dataset into a resumable store
    hf-influence embed       JVP embeddings of a dataset into a resumable store
    hf-influence train       select (or weight) pool rows for a target, then fine-tune with InfluenceSFTTrainer
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import HfArgumentParser

from .data import load_rows, sample_rows
from .distributed import process_state
from .encoders import encode_rows, encoder_identity, load_encoder
from .extract import extract_gradients, extract_jvp_embeddings
from .formatting import FormattingConfig, format_dataset
from .gradients import GradientConfig
from .hub import push_influence_network, push_score_table
from .influence import select_by_influence
from .methods.nn_cift import oracle_options
from .jvp import JVPConfig
from .models import DEFAULT_MODEL, LoraSettings, add_lora, load_model, model_identity
from .network import InfluenceNetwork
from .options import NNCIFTConfig, SelectionConfig
from .nn_cift import nn_cift
from .scores import ScoreTable, json_safe, provenance_record
from .selection import resolve_budget, select_indices
from .store import atomic_write_bytes, atomic_write_json, fingerprint_dataset
from .targets import load_target
from .warmup import WarmupConfig


@dataclass
class ModelArguments:
    """Which model to load.

    Attributes:
        model: Hub id or local folder of a causal LM (the default falls back to an offline copy).
        revision: Hub revision.
        dtype: "float32", "bfloat16" or "float16".
    """

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local folder of a causal LM."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})


@dataclass
class DataArguments:
    """Input rows and output folder.

    Attributes:
        data: jsonl/json/parquet/csv file (optionally .gz), a folder of them, or a Hub dataset id.
        output: output folder (stores and the summary are written there).
        split: split of a Hub dataset.
        limit: use only the first `limit` rows.
        overwrite: replace stores made with another model, dataset or configuration.
    """

    data: str | None = field(default=None, metadata={"help": "jsonl/json/parquet/csv file, folder, or Hub dataset id."})
    output: str = field(default="runs/hf-influence", metadata={"help": "Output folder."})
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    overwrite: bool = field(default=False, metadata={"help": "Replace mismatched stores instead of refusing them."})


@dataclass
class DemoArguments:
    """The embedded demo: a generated multi-domain pool and a math target.

    Attributes:
        rows_per_domain: pool rows generated per domain (math, code, qa, classification).
        target_rows: math target rows.
        demo_budget: rows to select (int) or share of the pool (float in (0, 1]).
        output: output folder.
        data_seed: data seed.
    """

    rows_per_domain: int = field(default=16, metadata={"help": "Pool rows per demo domain."})
    target_rows: int = field(default=8, metadata={"help": "Rows of the math target."})
    demo_budget: str = field(default="16", metadata={"help": "Rows (int) or pool share (float) to select."})
    output: str = field(default="runs/demo", metadata={"help": "Output folder."})
    data_seed: int = field(default=0, metadata={"help": "Data seed."})


@dataclass
class SelectArguments:
    """Pool, target, budget and where the selection goes.

    Attributes:
        pool: candidate training rows: jsonl/json/parquet/csv file (optionally .gz), a folder, or a Hub dataset id.
        target: rows of the task to improve, same forms.
        budget: rows to select (an integer) or a share of the pool (a float in (0, 1]).
        output: output folder: selected.jsonl, scores/ (the score table), report.json.
        pool_split: split of a Hub pool dataset.
        target_split: split of a Hub target dataset.
        pool_limit: use only the first N pool rows.
        target_limit: use only the first N target rows.
        group_column: pool column summarised in the report (share of each value in the selection vs the pool).
        save_scores: write the score table (scores/, every pool row x target row). False streams the selection
            for first-order landmark Influence Distillation: neither the [n, m] scores nor the [n, e] embeddings
            are held, so memory does not grow with the pool (see README, "Streaming selection").
    """

    pool: str | None = field(default=None, metadata={"help": "Pool file, folder or Hub dataset id."})
    target: str | None = field(default=None, metadata={"help": "Target file, folder or Hub dataset id."})
    budget: str = field(default="0.05", metadata={"help": "Rows (int) or pool share (float in (0, 1])."})
    output: str = field(default="runs/select", metadata={"help": "Output folder."})
    pool_split: str = field(default="train", metadata={"help": "Split of a Hub pool dataset."})
    target_split: str = field(default="test", metadata={"help": "Split of a Hub target dataset."})
    pool_limit: int | None = field(default=None, metadata={"help": "Use only the first N pool rows."})
    target_limit: int | None = field(default=None, metadata={"help": "Use only the first N target rows."})
    group_column: str = field(default="source", metadata={"help": "Pool column summarised in the report."})
    save_scores: bool = field(default=True, metadata={"help": "Write scores/ (False: streamed selection)."})


def _attribute_docs(dataclass_type: type) -> dict[str, str]:
    """{field: text} from the "Attributes:" section of a config dataclass's docstring."""
    docs: dict[str, str] = {}
    lines = inspect.getdoc(dataclass_type).splitlines() if dataclass_type.__doc__ else []
    in_attributes, current = False, None
    for line in lines:
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes:
            continue
        if line and not line.startswith(" "):
            break
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def _parse(argv: list[str], dataclass_types: tuple, description: str, defaults: dict | None = None) -> tuple:
    """Parse argv into the dataclasses; precedence: flags over the --config YAML over `defaults`."""
    parser = HfArgumentParser(dataclass_types, description=description)
    parser.set_defaults(**(defaults or {}))
    # The config dataclasses document each field in their docstrings: show that text in --help.
    docs = {name: text for dataclass_type in dataclass_types for name, text in _attribute_docs(dataclass_type).items()}
    for action in parser._actions:
        if not action.help and action.dest in docs:
            action.help = docs[action.dest].replace("%", "%%")
    parser.add_argument("--config", default=None, help="YAML file of defaults; flags override it.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        values = yaml.safe_load(Path(known.config).read_text()) or {}
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:  # argparse would silently ignore them
            parser.error(f"{known.config} has unknown keys {unknown}; see --help for the options of this command")
        parser.set_defaults(**values)
    *parsed, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    # The --config flag comes back as a trailing Namespace after the dataclasses.
    return tuple(parsed[: len(dataclass_types)])


def _load(model_args: ModelArguments):
    dtype = getattr(torch, model_args.dtype)
    # Under `accelerate launch` / torchrun each process runs the model on its own device.
    state = process_state()
    device = state.device if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(model_args.model, revision=model_args.revision, dtype=dtype, device=device)


def _is_main_process() -> bool:
    state = process_state()
    return state is None or state.is_main_process


def _budget(text: str) -> int | float:
    """'100' -> 100 rows, '0.05' -> 5% of the pool."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise SystemExit(f"--budget must be an integer (rows) or a float in (0, 1] (pool share), got {text!r}.")


def _group_shares(rows: Dataset, column: str) -> dict[str, float]:
    if column not in rows.column_names or len(rows) == 0:
        return {}
    values = [str(value) for value in rows[column]]
    return {value: values.count(value) / len(values) for value in sorted(set(values))}


def _selection_options(configs: tuple) -> dict:
    """The fields of the parsed config dataclasses as select_by_influence keyword options."""
    return {name: value for config in configs for name, value in asdict(config).items()}


def _write_selection(output: Path, selected: Dataset, table: ScoreTable | None, report: dict) -> None:
    """selected.jsonl, scores/ (unless table is None) and report.json under output, each written atomically."""
    output.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in selected)
    atomic_write_bytes(output / "selected.jsonl", lines.encode())
    if table is not None:
        table.save(output / "scores")
    atomic_write_json(output / "report.json", report)


def _print_report(report: dict) -> None:
    seconds = report["seconds"]
    print(f"\n{report['method']}: selected {report['selected_rows']} of {report['pool_rows']} pool rows "
          f"for {report['target_rows']} target rows in {seconds.get('total', 0.0):.1f} s")
    print("  stages: " + ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items() if stage != "total"))
    if "landmarks" in report:
        landmarks = report["landmarks"]
        bandwidth = ("" if landmarks["bandwidth_scale"] is None
                     else f"bandwidth {landmarks['bandwidth_scale']:g} x the median distance, ")
        spearman = "undefined" if landmarks["loo_spearman"] is None else f"{landmarks['loo_spearman']:.2f}"
        print(f"  landmarks: {landmarks['num_landmarks']} ({landmarks['landmark_share_pool']:.1%} of the pool, "
              f"{landmarks['landmark_share_selected']:.1%} of the selection); leave-one-out Spearman "
              f"{spearman}; {bandwidth}ridge {landmarks['ridge']:g}")
    if report["selected_share"]:
        print(f"\n  {'group':<32}{'pool share':>12}{'selected share':>16}")
        for group, share in sorted(report["pool_share"].items(), key=lambda item: -report["selected_share"].get(item[0], 0)):
            print(f"  {group:<32}{share:>12.3f}{report['selected_share'].get(group, 0.0):>16.3f}")


def _select_and_report(pool: Dataset, target: Dataset, model, tokenizer, budget, options: dict, group_column: str,
                       save_scores: bool = True):
    start = time.perf_counter()
    if save_scores:
        selected, table = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=budget,
                                              return_scores=True, **options)
        method, model_id, seconds = (table.provenance["method"], table.provenance["model_id"],
                                     table.provenance["details"].get("seconds", {}))
        landmarks = table.provenance["details"].get("landmarks")
    else:  # streamed: no table, so no per-stage timings or landmark diagnostics either (the warning still logs)
        selected = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=budget, **options)
        table, method, seconds = None, options["method"], {"total": time.perf_counter() - start}
        model_id, landmarks = model_identity(model)[0], None
    report = {
        "method": method, "model_id": model_id,
        "pool_rows": len(pool), "target_rows": len(target), "selected_rows": len(selected),
        "seconds": seconds,
        "pool_share": _group_shares(pool, group_column), "selected_share": _group_shares(selected, group_column),
    }
    if landmarks is not None:
        report["landmarks"] = landmarks
    return selected, table, report


SELECT_CONFIGS = (SelectionConfig, FormattingConfig, GradientConfig, JVPConfig, WarmupConfig, LoraSettings,
                  NNCIFTConfig)


def run_demo(argv: list[str]) -> dict:
    """Main job: Influence Distillation vs random on a generated multi-domain pool for a math target."""
    from .demo import demo_pool, demo_target

    demo, model_args, *configs = _parse(
        argv, (DemoArguments, ModelArguments, *SELECT_CONFIGS),
        "Select training rows for a math target from a generated multi-domain pool (math, code, extractive QA, "
        "classification) with Influence Distillation on the embedded default model, and compare with random.",
    )
    options = _selection_options(configs)
    if options["num_landmarks"] == SelectionConfig.num_landmarks:  # not set: a quarter of the pool, to show KRR
        options["num_landmarks"] = demo.rows_per_domain
    if options["response_column"] is None:
        options["response_column"] = "solution"  # the math target's worked answer (pool rows are chat rows)
    model, tokenizer = _load(model_args)
    pool = demo_pool(demo.rows_per_domain, seed=demo.data_seed)
    target = demo_target("math", demo.target_rows, seed=demo.data_seed + 1)
    output = Path(demo.output)
    summary = {}
    for method in (options["method"], "random"):
        selected, table, report = _select_and_report(pool, target, model, tokenizer, _budget(demo.demo_budget),
                                                     {**options, "method": method}, "source")
        _write_selection(output / method, selected, table, report)
        _print_report(report)
        summary[method] = {"in_domain_share": report["selected_share"].get("demo/math", 0.0),
                           "seconds": report["seconds"].get("total")}
    print(f"\nShare of the selection from the target's domain (demo/math; pool share "
          f"{_group_shares(pool, 'source')['demo/math']:.2f}):")
    for method, row in summary.items():
        print(f"  {method:<28}{row['in_domain_share']:.2f}")
    atomic_write_json(output / "summary.json", summary)
    print(f"\nSelections, score tables and reports in {output}/")
    return summary


def run_select(argv: list[str]) -> dict:
    """Select --budget rows of --pool for --target; write selected.jsonl, the score table and a report."""
    args, model_args, *configs = _parse(
        argv, (SelectArguments, ModelArguments, *SELECT_CONFIGS),
        "Select the pool rows that help most on the target (Influence Distillation by default; --method for "
        "influence_distillation_exact, less, rds, random).",
    )
    if not args.pool or not args.target:
        raise SystemExit("--pool and --target are required: a jsonl/json/parquet/csv file, a folder, or a Hub id.")
    pool = load_rows(args.pool, split=args.pool_split, limit=args.pool_limit)
    target = load_rows(args.target, split=args.target_split, limit=args.target_limit)
    model, tokenizer = _load(model_args)
    selected, table, report = _select_and_report(pool, target, model, tokenizer, _budget(args.budget),
                                                 _selection_options(configs), args.group_column, args.save_scores)
    _write_selection(Path(args.output), selected, table, report)
    _print_report(report)
    print(f"\nselected.jsonl, {'scores/ ' if table is not None else ''}and report.json in {args.output}/")
    return report


def _formatted_input(data: DataArguments, formatting: FormattingConfig, tokenizer):
    if not data.data:
        raise SystemExit("--data is required: a jsonl/json/parquet/csv file, a folder, or a Hub dataset id.")
    rows = load_rows(data.data, split=data.split, limit=data.limit)
    return format_dataset(rows, tokenizer, formatting)


def run_gradients(argv: list[str]) -> None:
    """Per-sample LoRA gradients of --data into a resumable store under --output."""
    data, model_args, lora, formatting, gradient_config = _parse(
        argv, (DataArguments, ModelArguments, LoraSettings, FormattingConfig, GradientConfig),
        "Per-sample LoRA gradients (preconditioned, normalised, projected) into a resumable store.",
    )
    model, tokenizer = _load(model_args)
    formatted = _formatted_input(data, formatting, tokenizer)
    if gradient_config.parameters == "lora":
        model = add_lora(model, lora)
    store = extract_gradients(model, formatted.dataset, data.output, gradient_config, overwrite=data.overwrite)
    if _is_main_process():
        print(f"{len(store)} rows x {store.dim} gradient store in {data.output} ({len(formatted.skipped)} rows skipped)")


def run_embed(argv: list[str]) -> None:
    """JVP embeddings of --data into a resumable store under --output."""
    data, model_args, formatting, jvp_config = _parse(
        argv, (DataArguments, ModelArguments, FormattingConfig, JVPConfig),
        "JVP embeddings (truncated model, random tangents, projected) into a resumable store.",
    )
    model, tokenizer = _load(model_args)
    formatted = _formatted_input(data, formatting, tokenizer)
    store = extract_jvp_embeddings(model, formatted.dataset, data.output, jvp_config, overwrite=data.overwrite)
    if _is_main_process():
        print(f"{len(store)} rows x {store.dim} JVP embedding store in {data.output} ({len(formatted.skipped)} rows skipped)")


@dataclass
class HubArguments:
    """An InfluenceNetwork or score table to load or push.

    Attributes:
        network: InfluenceNetwork folder (a fit-network output folder, or its network/ subfolder) or Hub repo id.
        scores: score-table folder (score tables are pushed with `--scores`).
        repo_id: Hub repo to push to (model repo for a network, dataset repo for a score table).
        config_name: config of the score table in its dataset repo (one per target set).
        private: create the repo private.
    """

    network: str | None = field(default=None, metadata={"help": "InfluenceNetwork folder or Hub repo id."})
    scores: str | None = field(default=None, metadata={"help": "Score-table folder."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repo to push to."})
    config_name: str = field(default="default", metadata={"help": "Config name of a pushed score table."})
    private: bool = field(default=False, metadata={"help": "Create a private repo."})


def _load_pool_and_target(args: SelectArguments) -> tuple[Dataset, Dataset]:
    if not args.pool or not args.target:
        raise SystemExit("--pool and --target are required: a jsonl/json/parquet/csv file, a folder, or a Hub id.")
    return (load_rows(args.pool, split=args.pool_split, limit=args.pool_limit),
            load_rows(args.target, split=args.target_split, limit=args.target_limit))


def run_fit_network(argv: list[str]) -> dict:
    """NN-CIFT: the oracle on a block, an InfluenceNetwork fitted on it; writes network/, scores/, report.json."""
    args, model_args, *configs = _parse(
        argv, (SelectArguments, ModelArguments, *SELECT_CONFIGS),
        "Distil an influence oracle (--oracle) into an InfluenceNetwork from a u-block (--block_fraction) of "
        "--pool x --target, predict every pair, and save the network, the score table and a report.",
    )
    pool, target = _load_pool_and_target(args)
    nn_config = next(config for config in configs if isinstance(config, NNCIFTConfig))
    needs_model = nn_config.oracle != "delift_se"
    model, tokenizer = _load(model_args) if needs_model else (None, None)
    options = oracle_options({type(config): config for config in configs})
    result = nn_cift(pool, target, nn_config, model=model, tokenizer=tokenizer,
                     show_progress=options.pop("show_progress"), **options)
    output = Path(args.output)
    result.network.save_pretrained(output / "network")
    training = {"block_rows": len(result.block_rows), "block_columns": len(result.block_columns),
                "block_fraction": nn_config.block_fraction}
    report = {"oracle": nn_config.oracle, "pool_rows": len(pool), "target_rows": len(target), "training": training,
              "seconds": result.seconds, "evaluation": result.evaluation}
    if result.evaluation_pairs is not None:
        save_file({"predicted": result.evaluation_pairs[0].contiguous(), "true": result.evaluation_pairs[1].contiguous()},
                  str(output / "evaluation_pairs.safetensors"))
    targets = [str(i) for i in (target["id"] if "id" in target.column_names else range(len(target)))]
    mask = torch.zeros(len(pool), dtype=torch.bool)
    mask[result.block_rows] = True
    table = ScoreTable.from_matrix(result.scores, list(range(len(pool))), targets if result.scores.shape[1] > 1
                                   else ["pointwise"], landmark_mask=mask, provenance=provenance_record(
                                       method="nn_cift", oracle=nn_config.oracle, configs=asdict(nn_config),
                                       pool_fingerprint=fingerprint_dataset(pool),
                                       target_fingerprint=fingerprint_dataset(target), details=report))
    table.save(output / "scores")
    atomic_write_json(output / "report.json", json_safe(report))
    print(f"\nInfluenceNetwork ({nn_config.oracle}) fitted on a {training['block_rows']} x {training['block_columns']} "
          f"block of {len(pool)} x {len(target)}: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    for name, quadrant in (result.evaluation or {}).items():
        if name.startswith("Q"):
            print(f"  {name}: MSE {quadrant['mse']:.4f} (mean baseline {quadrant['mean_baseline_mse']:.4f}), "
                  f"Spearman {quadrant['spearman']:.3f}")
    print(f"network/, scores/ and report.json in {output}/")
    return report


def run_predict(argv: list[str]) -> dict:
    """Score --pool x --target with an InfluenceNetwork; writes scores/ (and selected.jsonl with --budget)."""
    hub_args, args, selection = _parse(
        argv, (HubArguments, SelectArguments, SelectionConfig),
        "Predict influence for every (pool, target) pair with a saved or Hub InfluenceNetwork, using the "
        "encoder it was trained with, and select --budget rows (round-robin over targets by default).",
    )
    if not hub_args.network:
        raise SystemExit("--network is required: an InfluenceNetwork folder or Hub repo id.")
    pool, target = _load_pool_and_target(args)
    folder = Path(hub_args.network)
    network = InfluenceNetwork.from_pretrained(str(folder / "network" if (folder / "network").is_dir() else folder))
    encoder = load_encoder(network.embedding_model)
    start = time.perf_counter()
    pool_embeddings = encode_rows(pool, encoder)
    target_embeddings = encode_rows(target, encoder)
    scores = network.predict(pool_embeddings, None if network.kind == "pointwise" else target_embeddings,
                             embedding_model=encoder_identity(encoder)[0]).reshape(len(pool), -1)
    seconds = time.perf_counter() - start
    budget = resolve_budget(_budget(args.budget), len(pool))
    chosen = select_indices(scores, budget, rule=selection.selection or "round_robin", seed=selection.selection_seed)
    output = Path(args.output)
    targets = [str(i) for i in (target["id"] if "id" in target.column_names else range(len(target)))]
    table = ScoreTable.from_matrix(scores, list(range(len(pool))), targets if scores.shape[1] > 1 else ["pointwise"],
                                   provenance=provenance_record(method="nn_cift_predict", network=network.config,
                                                                pool_fingerprint=fingerprint_dataset(pool),
                                                                target_fingerprint=fingerprint_dataset(target)))
    selected = pool.select(chosen.tolist())
    report = {"method": "nn_cift_predict", "model_id": hub_args.network, "pool_rows": len(pool),
              "target_rows": len(target), "selected_rows": len(selected), "seconds": {"total": seconds},
              "pool_share": _group_shares(pool, args.group_column),
              "selected_share": _group_shares(selected, args.group_column)}
    _write_selection(output, selected, table, report)
    _print_report(report)
    return report


def run_push(argv: list[str]) -> str:
    """Push an InfluenceNetwork (--network, a fit-network folder) or a score table (--scores) to --repo_id."""
    (hub_args,) = _parse(argv, (HubArguments,), "Push an InfluenceNetwork (with its card and plot) or a score "
                                                "table (as a dataset repo config) to the Hugging Face Hub.")
    if not hub_args.repo_id or not (hub_args.network or hub_args.scores):
        raise SystemExit("push needs --repo_id and one of --network (a fit-network folder) or --scores.")
    if hub_args.scores:
        url = push_score_table(ScoreTable.load(hub_args.scores), hub_args.repo_id, config_name=hub_args.config_name,
                               private=hub_args.private)
    else:
        folder = Path(hub_args.network)
        report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else {}
        pairs_file = folder / "evaluation_pairs.safetensors"
        plot = None
        if pairs_file.exists():
            pairs = load_file(str(pairs_file))
            plot = (pairs["predicted"], pairs["true"])
        network = InfluenceNetwork.from_pretrained(str(folder / "network" if (folder / "network").is_dir() else folder))
        url = push_influence_network(network, hub_args.repo_id, training=report.get("training", {}),
                                     evaluation=report.get("evaluation"), plot=plot, private=hub_args.private)
    print(f"pushed to {url}")
    return url


@dataclass
class TrainDataArguments:
    """The pool to train on, the target to select for, and an optional held-out target to measure.

    Attributes:
        pool: training pool: jsonl/json/parquet/csv file (optionally .gz), a folder, or a Hub dataset id.
        pool_split: split of a Hub pool dataset.
        pool_sample: use a seeded random sample of N pool rows (sample_seed); None uses every row.
        target: target rows (file, folder or Hub id, any schema of hf_influence.targets); None with target_task
            reads that task's shared offline file under data_dir, else its Hub dataset.
        target_task: a task of hf_influence.targets.TARGET_TASKS (gsm8k, mmlu, bbh, tydiqa, squad, codex): names
            the target schema and its subtask column; None reads `target` as prompt/response rows.
        target_limit: use a seeded random sample of N target rows.
        eval_target: held-out rows of the task (same forms as target) whose loss is measured before and after
            training (the mean per-row response-token cross-entropy); None with eval_limit and target_task takes
            the task's held-out split (GSM8K test, MMLU test); None otherwise skips the measurement.
        eval_limit: use a seeded random sample of N held-out rows.
        data_dir: the shared offline data folder (holds targets/*.jsonl.gz), for target_task without target.
        sample_seed: seed of the samples (pool_sample, target_limit, eval_limit).
        use_lora: train a LoRA adapter (lora_* options) rather than every weight.
    """

    pool: str | None = field(default=None, metadata={"help": "Pool file, folder or Hub dataset id."})
    pool_split: str = field(default="train", metadata={"help": "Split of a Hub pool dataset."})
    pool_sample: int | None = field(default=None, metadata={"help": "Seeded random sample of N pool rows."})
    target: str | None = field(default=None, metadata={"help": "Target file, folder or Hub dataset id."})
    target_task: str | None = field(default=None, metadata={"help": "gsm8k, mmlu, bbh, tydiqa, squad or codex."})
    target_limit: int | None = field(default=None, metadata={"help": "Seeded random sample of N target rows."})
    eval_target: str | None = field(default=None, metadata={"help": "Held-out target rows: loss before/after."})
    eval_limit: int | None = field(default=None, metadata={"help": "Seeded random sample of N held-out rows."})
    data_dir: str | None = field(default=None, metadata={"help": "Shared offline data folder (targets/)."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the pool / target samples."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (lora_* options)."})


def _train_target(args: TrainDataArguments, source: str | None, limit: int | None, what: str) -> Dataset:
    if args.target_task is not None:
        return load_target(args.target_task, source=source, data_dir=args.data_dir, limit=limit, seed=args.sample_seed)
    if source is None:
        raise SystemExit(f"--{what} or --target_task is required: a file, folder or Hub id of the task's rows.")
    return sample_rows(load_rows(source, split="test" if what == "eval_target" else "train"), limit, args.sample_seed)


def run_train(argv: list[str]) -> dict:
    """Select (or weight) --pool rows for the target and fine-tune with InfluenceSFTTrainer; summary.json."""
    from peft import LoraConfig

    from .evaluation import target_loss
    from .trainer import InfluenceSFTConfig, InfluenceSFTTrainer

    data, model_args, lora, config = _parse(
        argv, (TrainDataArguments, ModelArguments, LoraSettings, InfluenceSFTConfig),
        "Fine-tune with TRL on the pool rows that help the target most: select --influence_budget rows (or "
        "weight every row, or re-select online) with --influence_method, then SFT (LoRA by default). Selection "
        "options go in --influence_options as JSON or a YAML mapping; every SFTConfig option is a flag too.",
        # SFTConfig defaults to bf16, which transformers refuses without a GPU.
        defaults=None if torch.cuda.is_available() else {"bf16": False},
    )
    if not data.pool:
        raise SystemExit("--pool is required: a jsonl/json/parquet/csv file, a folder, or a Hub dataset id.")
    pool = sample_rows(load_rows(data.pool, split=data.pool_split), data.pool_sample, data.sample_seed)
    # A score table replaces the target (target_task then only names the held-out rows); without either the
    # trainer needs a weight column, and says so.
    wants_target = (data.target or data.target_task) and config.influence_score_table is None
    target = _train_target(data, data.target, data.target_limit, "target") if wants_target else None
    model, tokenizer = _load(model_args)
    peft_config = None
    if data.use_lora:
        targets = lora.lora_target_modules
        peft_config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                 target_modules="all-linear" if targets in ("all-linear", ["all-linear"]) else targets,
                                 task_type="CAUSAL_LM")
    evaluation = None
    if data.eval_target:
        evaluation = _train_target(data, data.eval_target, data.eval_limit, "eval_target")
    elif data.eval_limit:
        if not data.target_task:
            raise SystemExit("--eval_limit needs --eval_target (held-out rows of the task) or --target_task.")
        evaluation = load_target(data.target_task, data_dir=data.data_dir, limit=data.eval_limit,
                                 seed=data.sample_seed, held_out=True)
    start = time.perf_counter()
    trainer = InfluenceSFTTrainer(model, args=config, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer, peft_config=peft_config)
    selection_seconds = time.perf_counter() - start
    summary = {"influence": json_safe({k: v for k, v in trainer.influence_summary().items() if k != "provenance"}),
               "selection_seconds": selection_seconds, "pool_rows": len(pool),
               "target_rows": None if target is None else len(target)}
    formatting = FormattingConfig(max_length=config.max_length or 1024, show_progress=False)
    if evaluation is not None:
        summary["target_loss_before"] = target_loss(trainer.model, tokenizer, evaluation, formatting)
    start = time.perf_counter()
    result = trainer.train()
    summary["train_seconds"] = time.perf_counter() - start
    summary["train_loss"] = result.training_loss
    summary["global_steps"] = result.global_step
    if evaluation is not None:
        summary["target_loss_after"] = target_loss(trainer.model, tokenizer, evaluation, formatting)
        summary["eval_rows"] = len(evaluation)
    trainer.save_model()
    if trainer.is_world_process_zero():
        trainer.create_model_card()  # TRL writes it only with checkpoints; the provenance belongs to the model
        atomic_write_json(Path(config.output_dir) / "summary.json", json_safe(summary))
        influence = summary["influence"]
        print(f"\n{influence['mode']} / {influence['method'] or influence['source']}: trained on "
              f"{influence['training_rows']} of {len(pool)} pool rows, {result.global_step} steps")
        rows = [("selection (s)", f"{selection_seconds:.1f}"), ("training (s)", f"{summary['train_seconds']:.1f}"),
                ("train loss", f"{result.training_loss:.4f}")]
        if evaluation is not None:
            rows += [("target loss before", f"{summary['target_loss_before']:.4f}"),
                     ("target loss after", f"{summary['target_loss_after']:.4f}")]
        for name, value in rows:
            print(f"  {name:<22}{value:>12}")
        print(f"model, model card (tagged hf_influence) and summary.json in {config.output_dir}/")
    return summary


COMMANDS = {"demo": run_demo, "select": run_select, "fit-network": run_fit_network, "predict": run_predict,
            "push": run_push, "gradients": run_gradients, "embed": run_embed,
            "train": run_train}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `hf-influence` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\nRun `hf-influence COMMAND --help` for the options of a command.")
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"\nUnknown command {argv[0]!r}: choose from {', '.join(COMMANDS)}.")
        return
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
