"""`hf-influence train`: select (or weight) pool rows for a target, then fine-tune with InfluenceSFTTrainer."""

from __future__ import annotations

import time
from pathlib import Path

from datasets import Dataset

from ..data import load_rows, sample_rows
from ..formatting import FormattingConfig
from ..model_passes import target_loss
from ..models import LoraSettings
from ..artifacts.scores import json_safe
from ..extraction.store import atomic_write_json
from ..targets import load_target
from ..trainer import InfluenceSFTTrainer
from ..trainer_config import InfluenceSFTConfig
from .arguments import ModelArguments, TrainDataArguments, load_cli_model, parse
from .select import check_writable_folder


def _train_target(args: TrainDataArguments, source: str | None, limit: int | None, what: str) -> Dataset:
    if args.target_task is not None:
        return load_target(args.target_task, source=source, data_dir=args.data_dir, limit=limit, seed=args.sample_seed)
    if source is None:
        raise SystemExit(f"--{what} or --target_task is required: a file, folder or Hub id of the task's rows.")
    return sample_rows(load_rows(source, split="test" if what == "eval_target" else "train"), limit, args.sample_seed)


def run_train(argv: list[str]) -> dict:
    """Select (or weight) --pool rows for the target and fine-tune with InfluenceSFTTrainer; summary.json."""
    data, model_args, lora, config = parse(
        argv, (TrainDataArguments, ModelArguments, LoraSettings, InfluenceSFTConfig),
        "Fine-tune with TRL on the pool rows that help the target most: select --influence_budget rows (or "
        "weight every row, or re-select online) with --influence_method, then SFT (LoRA by default). Selection "
        "options go in --influence_options as JSON or a YAML mapping; every SFTConfig option is a flag too "
        "(listed last).",
        command="train",
    )
    if not data.pool:
        raise SystemExit("--pool is required: a jsonl/json/parquet/csv file, a folder, or a Hub dataset id.")
    # Checked before the selection and training it would otherwise lose.
    check_writable_folder(Path(config.output_dir), "--output_dir")
    pool = sample_rows(load_rows(data.pool, split=data.pool_split), data.pool_sample, data.sample_seed)
    # A score table replaces the target (target_task then only names the held-out rows); without either the
    # trainer needs a weight column, and says so.
    wants_target = (data.target or data.target_task) and config.influence_score_table is None
    target = _train_target(data, data.target, data.target_limit, "target") if wants_target else None
    model, tokenizer = load_cli_model(model_args)
    peft_config = lora.to_peft_config() if data.use_lora else None
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
    formatting = FormattingConfig(max_length=config.max_length or 1024)
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
