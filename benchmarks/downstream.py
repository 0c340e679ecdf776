"""Does the selection help training? LoRA SFT on a 2% selection, GSM8K test loss before and after, per method.

    python benchmarks/downstream.py --json benchmarks/results/downstream_cpu.json [--pool-rows 3000 --budget 0.02]

Pool: a seeded slice of ../shared/data/pool.jsonl.gz (it holds GSM8K-train and AQuA rationales among ~96k
instruction rows); selection target: a handful of GSM8K *train* problems with worked solutions (the few-shot
target of the papers); evaluation: held-out GSM8K *test* rows, loss = mean over rows of the mean response-token
cross-entropy of the worked solution (`hf_influence.target_loss`). Model: SmolLM2-135M-Instruct (offline copy).

Every method gets the same budget, the same fresh model, the same LoRA SFT (InfluenceSFTTrainer in select mode:
it selects, then trains on the selected rows only) and the same evaluation rows. Reported per method:
`target_loss_before`, `target_loss_after`, `train_seconds`, `selection_seconds`, the selection's in-domain share.

Two calibrations tell whether a difference is signal:
- `--random-repeats K`: random selection with K selection seeds; `random` reports the first draw's keys plus
  `repeats` and the mean / standard deviation of the loss change over the draws (the noise floor of one draw).
- `--in-domain-reference`: `in_domain_random`, the same budget drawn at random from the pool's GSM8K / AQuA
  rationale rows only. It knows the source labels no method sees: a reference for what in-domain data is worth
  at this budget, not a method.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from peft import LoraConfig
from selection_quality import DEFAULT_DATA_DIR, in_domain_share, machine

from hf_influence import DEFAULT_MODEL, InfluenceSFTConfig, InfluenceSFTTrainer, load_model, load_target, target_loss
from hf_influence.data import load_rows
from hf_influence.formatting import FormattingConfig
from hf_influence.selection import resolve_budget


def run_method(method: str, pool, target, evaluation, args, output_dir: Path, budget: float | None = None,
               selection_seed: int = 0) -> dict:
    model, tokenizer = load_model(DEFAULT_MODEL)
    formatting = FormattingConfig(max_length=args.max_length, show_progress=False)
    before = target_loss(model, tokenizer, evaluation, formatting)
    config = InfluenceSFTConfig(
        output_dir=str(output_dir), influence_mode="select", influence_budget=args.budget if budget is None else budget,
        influence_method=method, influence_options={
            "num_landmarks": args.landmarks, "max_length": args.max_length, "show_progress": False,
            "warmup_show_progress": False, "selection_seed": selection_seed},
        num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_scheduler_type="constant", max_length=args.max_length, bf16=False, report_to="none", save_strategy="no",
        logging_steps=10, disable_tqdm=True, seed=args.seed, gradient_checkpointing=False,  # 135M: memory is no issue
    )
    start = time.perf_counter()
    trainer = InfluenceSFTTrainer(model, args=config, train_dataset=pool, target_dataset=target,
                                  processing_class=tokenizer,
                                  peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
    selection_seconds = time.perf_counter() - start
    selected = trainer.influence_selections[-1].row_ids
    start = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - start
    after = target_loss(trainer.model, tokenizer, evaluation, formatting)
    record = {"target_loss_before": before, "target_loss_after": after, "target_loss_change": after - before,
              "train_seconds": train_seconds, "selection_seconds": selection_seconds, "train_loss": result.training_loss,
              "steps": result.global_step, "selected_rows": len(selected),
              "in_domain_share": in_domain_share([pool[i]["source"] for i in selected])}
    print(f"{method:<24} before {before:.4f} after {after:.4f} (change {after - before:+.4f}); in-domain share "
          f"{record['in_domain_share']:.2f}; selection {selection_seconds:.0f} s, training {train_seconds:.0f} s",
          flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--pool-rows", type=int, default=3000)
    parser.add_argument("--target-rows", type=int, default=32, help="GSM8K train rows the selection aims at")
    parser.add_argument("--eval-rows", type=int, default=200, help="held-out GSM8K test rows")
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--landmarks", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["influence_distillation", "random"])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-repeats", type=int, default=1, help="random draws (selection seeds 0..K-1)")
    parser.add_argument("--in-domain-reference", action="store_true",
                        help="also train on the budget drawn from the in-domain rows only (a reference)")
    args = parser.parse_args()
    if not (args.data_dir / "pool.jsonl.gz").exists():
        print(f"skipped: {args.data_dir / 'pool.jsonl.gz'} not found")
        return 0
    torch.manual_seed(args.seed)
    pool = load_rows(args.data_dir / "pool.jsonl.gz").shuffle(seed=args.seed).select(range(args.pool_rows))
    target = load_target("gsm8k", data_dir=args.data_dir, limit=args.target_rows, seed=args.seed)
    evaluation = load_target("gsm8k", source=args.data_dir / "targets" / "gsm8k_test.jsonl.gz",
                             limit=args.eval_rows, seed=args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="downstream_") as scratch:
        for method in args.methods:
            results[method] = run_method(method, pool, target, evaluation, args, Path(scratch) / method)
        if "random" in results and args.random_repeats > 1:
            draws = [results["random"]] + [run_method("random", pool, target, evaluation, args,
                                                      Path(scratch) / f"random-{seed}", selection_seed=seed)
                                           for seed in range(1, args.random_repeats)]
            changes = torch.tensor([draw["target_loss_change"] for draw in draws], dtype=torch.float64)
            results["random"] = {**draws[0], "repeats": draws, "target_loss_change_mean": changes.mean().item(),
                                 "target_loss_change_std": changes.std().item()}
        if args.in_domain_reference:
            budget_rows = resolve_budget(args.budget, len(pool))
            in_domain_pool = pool.filter(lambda row: in_domain_share([row["source"]]) == 1.0)
            results["in_domain_random"] = run_method("random", in_domain_pool, target, evaluation, args,
                                                     Path(scratch) / "in_domain", budget=budget_rows)
    report = {**results, "config": {**vars(args), "json": str(args.json), "data_dir": str(args.data_dir)},
              "pool_in_domain_share": in_domain_share(pool["source"]), "machine": machine()}
    print(f"\nLoRA SFT on {args.budget:.0%} of {len(pool)} pool rows; GSM8K test loss on {len(evaluation)} rows")
    print(f"{'method':<24}{'before':>9}{'after':>9}{'change':>9}{'in-domain':>11}{'train s':>9}{'select s':>10}")
    for method, row in results.items():
        if "repeats" in row:
            print(f"{method:<24}loss change over {len(row['repeats'])} draws: mean "
                  f"{row['target_loss_change_mean']:+.4f}, std {row['target_loss_change_std']:.4f}")
        print(f"{method:<24}{row['target_loss_before']:>9.4f}{row['target_loss_after']:>9.4f}"
              f"{row['target_loss_change']:>+9.4f}{row['in_domain_share']:>11.2f}{row['train_seconds']:>9.0f}"
              f"{row['selection_seconds']:>10.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
