"""Warm-up: a short LoRA AdamW run on a random slice of the pool, for Adam-aware influence.

Influence Distillation and LESS precondition per-sample gradients with the state of an AdamW optimizer
(first and second moments) after a brief warm-up training run. `warmup` runs that training with TRL's
`SFTTrainer` on the already formatted rows and returns the `torch.optim.AdamW` whose state then feeds
`affine_step(optimizer, PerSampleGradients(model).parameters)`. `load_optimizer_state` reads the same state
from a user's own transformers/TRL Trainer checkpoint instead.

Rows go to TRL as a pre-tokenised dataset: TRL 1.x treats a dataset with an `input_ids` column as already
processed and uses a `labels` column verbatim (-100 = no loss), so the loss is on response tokens only,
exactly where our formatter put labels; it builds no labels from masks and re-tokenises nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from .errors import HFInfluenceError
from .extraction.distributed import process_state
from .formatting import FormattedDataset
from .extraction.store import OVERWRITE
from .validation import is_int, is_number
from .verbosity import get_logger

logger = get_logger(__name__)

OPTIMIZER_FILE = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME
# transformers.Trainer.get_decay_parameter_names: parameters matching these never get weight decay and go to the
# second parameter group of the optimizer the Trainer builds.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


# Where influence's optimizer state comes from (WarmupConfig.optimizer_state); the first two warm up.
OPTIMIZER_STATES = ("warmup", "warmup_gd", "gd")


@dataclass
class WarmupConfig:
    """Where the optimizer state that preconditions influence scores comes from when no optimizer is passed: the
    warm-up training run (LoRA, AdamW) and its settings, or none (plain gradient descent).

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "warm-up (WarmupConfig)"

    optimizer_state: str = field(
        default="warmup",
        metadata={"help": 'where the Adam state comes from when no optimizer object is passed: "warmup" (a short '
                          'LoRA AdamW run on a slice of the pool, the warmup_* options), "warmup_gd" (the same '
                          'warm-up moves the weights, then plain gradient descent: no preconditioning) or "gd" '
                          "(plain gradient descent, no preconditioning, no warm-up)."})
    warmup_fraction: float = field(
        default=0.05,
        metadata={"help": "share of the pool trained on during warm-up, in (0, 1] (LESS uses 0.05)."})
    warmup_max_rows: int | None = field(
        default=None,
        metadata={"help": "cap on the number of warm-up rows; None for no cap."})
    warmup_epochs: float = field(
        default=1.0,
        metadata={"help": "passes over the warm-up rows (may be fractional); ignored when warmup_max_steps > 0."})
    warmup_max_steps: int = field(
        default=-1,
        metadata={"help": "number of optimizer steps; -1 trains for warmup_epochs instead."})
    warmup_min_steps: int = field(
        default=10,
        metadata={"help": "with warmup_max_steps=-1, train at least this many steps (cycling the slice): from "
                          "PEFT's B = 0 start, one or two steps leave the second moment of most LoRA A "
                          "coordinates at ~0, and Adam's preconditioner a2 / (sqrt(v) + eps) then blows up there "
                          "(measured: a 1-step warm-up on the demo made selection worse than random; 8 steps "
                          "fixed it)."})
    warmup_learning_rate: float = field(
        default=2e-5,
        metadata={"help": "AdamW learning rate, constant during warm-up (LESS uses 2e-5)."})
    warmup_batch_size: int = field(default=4, metadata={"help": "rows per device batch."})
    warmup_gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "batches accumulated per optimizer step."})
    warmup_weight_decay: float = field(default=0.0, metadata={"help": "AdamW (decoupled) weight decay."})
    warmup_seed: int = field(default=0, metadata={"help": "seed of the row slice, the data order and the trainer."})
    warmup_show_progress: bool = field(
        default=False,
        metadata={"help": "show the warm-up trainer's progress bar and per-step logs (off by default: the warm-up is "
                          "an internal step of a selection, and its trainer would print loss dicts that no logging "
                          "switch silences)."})

    def __post_init__(self) -> None:
        def fail(name: str, requirement: str) -> None:
            raise ValueError(f"WarmupConfig.{name} must be {requirement}, got {getattr(self, name)!r}.")

        if self.optimizer_state not in OPTIMIZER_STATES:
            fail("optimizer_state", f"one of {list(OPTIMIZER_STATES)}")
        if not is_number(self.warmup_fraction) or not 0 < self.warmup_fraction <= 1:
            fail("warmup_fraction", "in (0, 1]")
        if self.warmup_max_rows is not None and (not is_int(self.warmup_max_rows) or self.warmup_max_rows < 1):
            fail("warmup_max_rows", "None or an integer >= 1")
        if not is_number(self.warmup_epochs) or not math.isfinite(self.warmup_epochs) or self.warmup_epochs <= 0:
            fail("warmup_epochs", "a finite number > 0")
        if not is_int(self.warmup_max_steps) or (self.warmup_max_steps != -1 and self.warmup_max_steps < 1):
            fail("warmup_max_steps", "-1 (train for warmup_epochs) or an integer >= 1")
        if not is_int(self.warmup_min_steps) or self.warmup_min_steps < 0:
            fail("warmup_min_steps", "an integer >= 0")
        if (
            not is_number(self.warmup_learning_rate)
            or not math.isfinite(self.warmup_learning_rate)
            or self.warmup_learning_rate <= 0
        ):
            fail("warmup_learning_rate", "a finite number > 0")
        if not is_int(self.warmup_batch_size) or self.warmup_batch_size < 1:
            fail("warmup_batch_size", "an integer >= 1")
        if not is_int(self.warmup_gradient_accumulation_steps) or self.warmup_gradient_accumulation_steps < 1:
            fail("warmup_gradient_accumulation_steps", "an integer >= 1")
        if (
            not is_number(self.warmup_weight_decay)
            or not math.isfinite(self.warmup_weight_decay)
            or self.warmup_weight_decay < 0
        ):
            fail("warmup_weight_decay", "a finite number >= 0")
        if not is_int(self.warmup_seed) or not 0 <= self.warmup_seed < 2**32:
            fail("warmup_seed", "an integer in [0, 2**32)")
        if not isinstance(self.warmup_show_progress, bool):
            fail("warmup_show_progress", "a bool")


@dataclass
class WarmupResult:
    """What `warmup` returns.

    Attributes:
        optimizer: the torch.optim.AdamW after warm-up (state: exp_avg, exp_avg_sq, step), holding the model's
            LoRA parameters; pass it to `affine_step`.
        row_ids: the pool rows trained on (the formatted dataset's `row_id` values), sorted.
        losses: training loss of each logged (optimizer) step, response tokens only.
        steps: number of optimizer steps taken.
    """

    optimizer: torch.optim.AdamW
    row_ids: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    steps: int = 0


def warmup_rows(num_rows: int, config: WarmupConfig | None = None) -> list[int]:
    """Positions (sorted) of the warm-up slice: a `warmup_seed` permutation of `num_rows`, cut to
    max(1, round(warmup_fraction * num_rows)) rows, at most `warmup_max_rows`."""
    config = config or WarmupConfig()
    if num_rows < 1:
        raise ValueError("The pool is empty: there is nothing to warm up on.")
    size = max(1, round(config.warmup_fraction * num_rows))
    if config.warmup_max_rows is not None:
        size = min(size, config.warmup_max_rows)
    permutation = np.random.default_rng(config.warmup_seed).permutation(num_rows)
    return sorted(int(i) for i in permutation[:size])


def warmup(
    model: nn.Module,
    tokenizer,
    formatted: Dataset | FormattedDataset,
    config: WarmupConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> WarmupResult:
    """Train `model`'s LoRA weights briefly with AdamW on a random slice of `formatted` and return the optimizer.

    The model is trained in place (its LoRA weights change: gradients are then taken at the warmed-up
    weights, as LESS does), then left in eval mode with its `requires_grad` flags as before. The global random
    state (python, numpy, torch) is left as it was.

    With `cache_dir`, the warmed-up LoRA weights and the optimizer state are saved there (safetensors + a JSON
    manifest, written atomically), and a later call with the same rows, config, model and initial adapter
    weights loads both instead of training: a resumed or repeated selection gets the bitwise same model and
    preconditioner, so the gradient stores made with them still match (a GPU warm-up rerun is not bitwise
    reproducible).

    Args:
        model: a PEFT LoRA model (trainable parameters = LoRA weights), e.g. from `hf_influence.add_lora`.
        tokenizer: the model's tokenizer (its pad id pads batches; padding carries no loss).
        formatted: `format_dataset(...).dataset` (or the FormattedDataset): columns `input_ids`, `labels`
            (-100 on prompt tokens) and optionally `row_id` and `attention_mask`.
        config: warm-up settings.
        cache_dir: folder of the saved warm-up (see above); None trains every time.
        overwrite: replace a warm-up saved in cache_dir for other rows, settings, model or initial adapter
            weights (default: refuse it with WarmupMismatchError, before any training, so that neither the
            saved warm-up nor the stores made with it are lost by mistake).

    Returns:
        WarmupResult with the torch.optim.AdamW, the rows trained on, the per-step losses and the step count.

    Raises:
        ValueError: not a PEFT model or no trainable parameter, missing columns, an empty dataset, labels and
            input_ids of different lengths, or rows with attention_mask zeros (pass unpadded formatted rows).
        WarmupMismatchError: cache_dir holds a warm-up made for something else, and overwrite is False.
    """
    config = config or WarmupConfig()
    dataset = formatted.dataset if isinstance(formatted, FormattedDataset) else formatted
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"formatted must be a datasets.Dataset (format_dataset(...).dataset), got {type(dataset).__name__}."
        )
    missing = [column for column in ("input_ids", "labels") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The formatted dataset lacks columns {missing} (has {dataset.column_names}); build it with format_dataset."
        )
    if not getattr(model, "peft_config", None):
        raise ValueError("warmup needs a PEFT LoRA model: wrap the model with hf_influence.add_lora(model) first.")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameter: warm-up trains the LoRA weights, none require grad.")

    state = process_state()
    if state is not None and config.warmup_batch_size % state.num_processes:
        raise ValueError(f"WarmupConfig.warmup_batch_size={config.warmup_batch_size} must be a multiple of the "
                         f"{state.num_processes} processes of this launch: each warm-up batch is split between them.")
    positions = warmup_rows(len(dataset), config)
    subset = dataset.select(positions)
    if "attention_mask" in subset.column_names and any(0 in mask for mask in subset["attention_mask"]):
        raise ValueError(
            "Some warm-up rows have attention_mask zeros; TRL pads batches itself and would attend to those "
            "tokens. Pass unpadded rows (format_dataset output)."
        )
    if any(len(ids) != len(labels) for ids, labels in zip(subset["input_ids"], subset["labels"])):
        raise ValueError("Some warm-up rows have labels and input_ids of different lengths; use format_dataset.")
    row_ids = sorted(int(r) for r in subset["row_id"]) if "row_id" in subset.column_names else list(positions)
    train_dataset = subset.select_columns(["input_ids", "labels"])
    identity = _cache_identity(model, dataset, config) if cache_dir is not None else None
    if identity is not None:
        cached = _load_cached(model, Path(cache_dir), identity, overwrite)
        if cached is not None:
            return cached

    device = trainable[0][1].device
    frozen = [p for _, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()]
    model_dtype = (frozen or [trainable[0][1]])[0].dtype
    snapshot = _model_snapshot(model)

    with (tempfile.TemporaryDirectory(prefix="hf_influence_warmup_") as output_dir, _preserved_rng(device),
          _preserved_accelerate_state()):
        trainer = _make_trainer(model, tokenizer, train_dataset, config, output_dir, device, model_dtype)
        try:
            trainer.train()
        finally:
            _restore_model(model, snapshot)
        optimizer = _unwrap_optimizer(trainer.optimizer)
        losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
        steps = int(trainer.state.global_step)
        del trainer

    _check_optimizer(optimizer, [p for _, p in trainable], config.warmup_learning_rate)
    result = WarmupResult(optimizer=optimizer, row_ids=row_ids, losses=losses, steps=steps)
    # Every rank ends the warm-up with the same state (DDP); one writer is enough.
    if identity is not None and (state is None or state.is_main_process):
        _save_cached(result, model, Path(cache_dir), identity)
    return result


CACHE_MANIFEST, CACHE_TENSORS = "warmup.json", "optimizer.safetensors"


def _cache_identity(model: nn.Module, dataset: Dataset, config: WarmupConfig) -> dict:
    """What a saved warm-up must have been made from: rows, settings, model, and the adapter's initial weights
    (they fix the LoRA seed and rank, or a user's own adapter)."""
    from .models import adapter_digest, model_identity, weights_digest
    from .extraction.store import fingerprint_dataset

    # Neither changes the warm-up's result (optimizer_state="gd" runs none).
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in ("warmup_show_progress", "optimizer_state")}
    return {"format": 1, "rows": fingerprint_dataset(dataset), "config": settings,
            "model": list(model_identity(model)), "weights": weights_digest(model),
            "initial_adapter": adapter_digest(model)}


def _save_cached(result: WarmupResult, model: nn.Module, folder: Path, identity: dict) -> None:
    """optimizer.safetensors (the warmed-up weight, exp_avg, exp_avg_sq and step of each trainable parameter),
    then warmup.json: the manifest is written last and removed first, so a crash in between leaves no manifest
    and the next call retrains."""
    from safetensors.torch import save as save_tensors

    from .extraction.store import atomic_write_bytes, atomic_write_json

    names = {id(p): name for name, p in model.named_parameters()}
    groups, tensors = [], {}
    for group in result.optimizer.param_groups:
        # Hyperparameters as JSON: numbers, flags and betas; None-valued switches (foreach, fused) keep defaults.
        hyperparameters = {key: value for key, value in group.items()
                           if key == "betas" or (key != "params" and isinstance(value, (int, float, bool)))}
        groups.append({"params": [names[id(p)] for p in group["params"]], **hyperparameters})
        for parameter in group["params"]:
            tensors[f"{names[id(parameter)]}::weight"] = parameter.detach().cpu().contiguous()
            for key, value in result.optimizer.state.get(parameter, {}).items():
                tensors[f"{names[id(parameter)]}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_MANIFEST).unlink(missing_ok=True)
    data = save_tensors(tensors)
    atomic_write_bytes(folder / CACHE_TENSORS, data)
    atomic_write_json(folder / CACHE_MANIFEST, {"identity": identity, "param_groups": groups,
                                               "row_ids": result.row_ids, "losses": result.losses,
                                               "steps": result.steps,
                                               "tensors_sha256": hashlib.sha256(data).hexdigest()})


class WarmupMismatchError(HFInfluenceError, ValueError):
    """A work_dir's saved warm-up was made for other rows, settings, model or initial adapter weights."""


class CorruptWarmupError(HFInfluenceError, ValueError):
    """A work_dir's saved warm-up cannot be trusted: its manifest is unreadable or its tensors differ from the
    SHA-256 recorded when it was saved."""


# What each part of a warm-up's identity is, for the refusal message.
_IDENTITY_PARTS = {"rows": "pool rows (data or max_length)", "config": "warm-up settings", "model": "model id",
                   "weights": "model weights", "initial_adapter": "initial adapter weights", "format": "format"}


def _load_cached(model: nn.Module, folder: Path, identity: dict, overwrite: bool) -> WarmupResult | None:
    """The saved warm-up when `folder` holds one made for `identity`; None when there is none, or when it
    differs and `overwrite` (it is then replaced); else WarmupMismatchError naming what differs."""
    from safetensors.torch import load

    manifest_file = folder / CACHE_MANIFEST
    if not manifest_file.is_file():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        return _corrupt(folder, f"{manifest_file} is not a warm-up manifest ({error})", overwrite)
    stored = manifest.get("identity") or {}
    if stored != identity:
        differs = [_IDENTITY_PARTS.get(key, key) for key in sorted(identity.keys() | stored.keys())
                   if stored.get(key) != identity.get(key)]
        if not overwrite:
            raise WarmupMismatchError(
                f"The warm-up saved in {folder} differs from this run in: {', '.join(differs)}. Nothing was changed. Use "
                f"another work_dir for this run, or pass {OVERWRITE} to replace the saved "
                f"warm-up and the stores made with it.")
        logger.warning("overwrite=True: the warm-up saved in %s differs from this run in: %s; training again and "
                       "replacing it.", folder, ", ".join(differs))
        return None
    data = (folder / CACHE_TENSORS).read_bytes() if (folder / CACHE_TENSORS).is_file() else None
    recorded = manifest.get("tensors_sha256")  # None in warm-ups saved before it was recorded
    if data is None or (recorded is not None and hashlib.sha256(data).hexdigest() != recorded):
        problem = "is missing" if data is None else "differs from the SHA-256 recorded when it was saved"
        return _corrupt(folder, f"{folder / CACHE_TENSORS} {problem}", overwrite)
    tensors = load(data)
    parameters = dict(model.named_parameters())
    groups = [{**group, "params": [parameters[name] for name in group["params"]],
               "betas": tuple(group.get("betas", (0.9, 0.999)))} for group in manifest["param_groups"]]
    optimizer = torch.optim.AdamW(groups)
    for key, value in tensors.items():
        name, state_key = key.split("::", 1)
        parameter = parameters[name]
        if state_key == "weight":
            with torch.no_grad():
                parameter.copy_(value)
        else:  # `step` stays a CPU scalar, as torch.optim.AdamW keeps it (not capturable)
            optimizer.state[parameter][state_key] = value if state_key == "step" else value.to(parameter.device)
    model.eval()  # as a trained warm-up leaves it
    logger.info("Loaded the warm-up optimizer state from %s (%d steps).", folder, manifest["steps"])
    return WarmupResult(optimizer=optimizer, row_ids=manifest["row_ids"], losses=manifest["losses"],
                        steps=manifest["steps"])


def _corrupt(folder: Path, problem: str, overwrite: bool) -> None:
    """A damaged saved warm-up: refused (CorruptWarmupError), or with `overwrite` trained again (returns None)."""
    if not overwrite:
        raise CorruptWarmupError(f"The warm-up saved in {folder} is damaged: {problem}. Delete that folder or pass "
                                 f"{OVERWRITE} to train it again.")
    logger.warning("overwrite=True: the warm-up saved in %s is damaged (%s); training it again.", folder, problem)
    return None


def _max_steps(config: WarmupConfig, num_rows: int) -> int:
    """The Trainer's max_steps: warmup_max_steps, else -1 (epochs) unless the epochs give < warmup_min_steps."""
    if config.warmup_max_steps > 0:
        return int(config.warmup_max_steps)
    per_epoch = math.ceil(num_rows / (config.warmup_batch_size * config.warmup_gradient_accumulation_steps))
    epoch_steps = math.ceil(config.warmup_epochs * per_epoch)
    return int(config.warmup_min_steps) if epoch_steps < config.warmup_min_steps else -1


def _make_trainer(model, tokenizer, train_dataset, config, output_dir, device, model_dtype):
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=float(config.warmup_epochs),
        max_steps=_max_steps(config, len(train_dataset)),
        learning_rate=float(config.warmup_learning_rate),
        # Constant lr (no warm-up ratio, no decay): the optimizer's final lr is then exactly warmup_learning_rate,
        # the eta of the affine step taken from it, and every parameter group has the same lr (affine_step refuses
        # mixed lrs). A decaying schedule would leave lr near 0 at the end and make the step meaningless.
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",  # plain torch.optim.AdamW (not fused/8-bit): affine_step reads its state
        weight_decay=float(config.warmup_weight_decay),
        per_device_train_batch_size=int(config.warmup_batch_size),
        gradient_accumulation_steps=int(config.warmup_gradient_accumulation_steps),
        # Under a multi-process launch the Trainer runs DDP: with split_batches each rank takes its share of the
        # same warmup_batch_size rows a single process would, so the run matches one process (to rounding)
        # instead of taking num_processes times larger steps, half as many.
        accelerator_config={"split_batches": True},
        seed=int(config.warmup_seed),
        data_seed=int(config.warmup_seed),
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=not config.warmup_show_progress,
        dataloader_drop_last=False,
        dataloader_num_workers=0,
        # Rows are already truncated by format_dataset: None stops TRL from truncating again (and from dropping
        # rows, which would desynchronise row_ids).
        max_length=None,
        packing=False,
        padding_free=False,
        completion_only_loss=None,  # irrelevant: a `labels` column is used as is
        assistant_only_loss=False,
        bf16=model_dtype == torch.bfloat16,
        fp16=model_dtype == torch.float16 and device.type != "cpu",
        use_cpu=device.type == "cpu",
        label_names=["labels"],
        # Only input_ids and labels are passed; the collator adds attention_mask.
        remove_unused_columns=True,
        # TRL turns gradient checkpointing on by default, which would patch the model (input-grad hooks).
        **_no_checkpointing(SFTConfig),
    )
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Our own collator (TRL's default one): without it TRL writes a pad token into the tokenizer and model config.
    collator = DataCollatorForLanguageModeling(pad_token_id=0 if pad_token_id is None else int(pad_token_id))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, data_collator=collator
    )
    if not config.warmup_show_progress:
        trainer.remove_callback(PrinterCallback)
    return trainer


def _no_checkpointing(config_class) -> dict[str, bool]:
    """`activation_checkpointing=False` (transformers >= 5.23), else its deprecated alias `gradient_checkpointing`."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


@contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Trainer calls set_seed (python, numpy, torch): keep the caller's random streams untouched."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def _preserved_accelerate_state() -> Iterator[None]:
    """The warm-up's Trainer resets and re-initialises accelerate's process-wide states (its own precision, its
    own gradient accumulation). Put the caller's back afterwards: a trainer the caller built before the warm-up
    (InfluenceSFTTrainer in select mode, whose TrainingArguments already set up its devices) would otherwise meet
    an AcceleratorState fixed at the warm-up's precision and refuse its own ("already initialized")."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    states = (PartialState, AcceleratorState, GradientState)
    saved = [dict(state._shared_state) for state in states]
    try:
        yield
    finally:
        for state, values in zip(states, saved):
            state._shared_state.clear()
            state._shared_state.update(values)


_PATCHED_ATTRIBUTES = ("forward", "_original_forward")
_MISSING = object()


def _model_snapshot(model: nn.Module) -> dict:
    """What training may change on the model: requires_grad flags, instance-level forward patches and the
    config / generation config.

    SFTTrainer replaces the base model's forward with a fused-LM-head wrapper (an instance attribute) and
    accelerate may wrap the forward for mixed precision; the Trainer turns `use_cache` off and aligns the config's
    special-token ids with the tokenizer's. The snapshot lets `_restore_model` undo all of it.
    """
    modules = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    configs = [config for config in (getattr(model, "config", None), getattr(model, "generation_config", None))
               if config is not None]
    return {
        "requires_grad": [(p, p.requires_grad) for p in model.parameters()],
        "attributes": [(m, a, m.__dict__.get(a, _MISSING)) for m in modules for a in _PATCHED_ATTRIBUTES],
        "configs": [(config, copy.deepcopy(config.__dict__)) for config in configs],
    }


def _restore_model(model: nn.Module, snapshot: dict) -> None:
    """Eval mode, the requires_grad flags and forward attributes of `snapshot`."""
    model.eval()
    for parameter, flag in snapshot["requires_grad"]:
        parameter.requires_grad_(flag)
    for module, attribute, value in snapshot["attributes"]:
        if value is _MISSING:
            module.__dict__.pop(attribute, None)
        else:
            module.__dict__[attribute] = value
    for config, values in snapshot["configs"]:  # in place: the model's submodules share these objects
        config.__dict__.clear()
        config.__dict__.update(values)


def _unwrap_optimizer(optimizer) -> torch.optim.AdamW:
    """accelerate's AcceleratedOptimizer (and similar wrappers) -> the torch.optim.AdamW inside."""
    seen = 0
    while not isinstance(optimizer, torch.optim.AdamW) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.AdamW):
        raise TypeError(f"The trainer built a {type(optimizer).__name__}, not torch.optim.AdamW.")
    return optimizer


def _check_optimizer(optimizer: torch.optim.AdamW, parameters: list[nn.Parameter], lr: float) -> None:
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if {id(p) for p in held} != {id(p) for p in parameters} or len(held) != len(parameters):
        raise RuntimeError("The warm-up optimizer does not hold exactly the model's trainable (LoRA) parameters.")
    lrs = {float(group["lr"]) for group in optimizer.param_groups if group["params"]}
    if lrs != {float(lr)}:
        raise RuntimeError(f"The warm-up optimizer ended with learning rates {sorted(lrs)}, expected {lr}.")


def trainer_parameter_order(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The trainable parameters grouped as transformers.Trainer.create_optimizer groups them:
    [decay group, no-decay group], each in `named_parameters` order."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [[(n, p) for n, p in trainable if n in decay], [(n, p) for n, p in trainable if n not in decay]]


def load_optimizer_state(model: nn.Module, checkpoint_dir: str | os.PathLike) -> torch.optim.AdamW:
    """A torch.optim.AdamW over `model`'s trainable parameters with the state of a Trainer checkpoint.

    Reads `optimizer.pt` as saved by transformers.Trainer / TRL's trainers (`checkpoint-N/` folders) for the same
    PEFT model, with `torch.load(weights_only=True)`: tensors and plain values only, never arbitrary objects.
    The parameters are grouped and ordered as Trainer.create_optimizer does (decay group, then no-decay group),
    which is the order the saved state is indexed by; hyperparameters (lr, betas, eps, weight decay) come from
    the checkpoint.

    Args:
        model: the PEFT model the checkpoint was trained with (same adapters, same trainable parameters).
        checkpoint_dir: the checkpoint folder (or the optimizer.pt file itself).

    Returns:
        torch.optim.AdamW holding the model's parameter objects, ready for `affine_step`.

    Raises:
        FileNotFoundError: no optimizer.pt (the message lists checkpoint-* subfolders if there are some).
        ValueError: the file cannot be read safely, is not an Adam state, or its parameter count or shapes do
            not match the model's trainable parameters.
    """
    path = Path(checkpoint_dir)
    file = path if path.is_file() else path / OPTIMIZER_FILE
    if not file.is_file():
        hint = ""
        if path.is_dir():
            checkpoints = sorted(
                (p.name for p in path.glob("checkpoint-*") if (p / OPTIMIZER_FILE).is_file()),
                key=lambda name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else -1,
            )
            if checkpoints:
                hint = f" It holds checkpoint folders {checkpoints}: pass one of them, e.g. {path / checkpoints[-1]}."
        raise FileNotFoundError(
            f"No {OPTIMIZER_FILE} in {path}: pass a transformers/TRL Trainer checkpoint folder saved with its "
            f"optimizer (not save_only_model).{hint}"
        )
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"Cannot read {file} as a plain optimizer state dict (weights_only=True): {error}") from error
    if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
        raise ValueError(f"{file} is not a torch optimizer state dict (no 'state' / 'param_groups').")

    groups = trainer_parameter_order(model)
    flat = [item for group in groups for item in group]
    if not flat:
        raise ValueError("The model has no trainable parameter to attach the optimizer state to.")
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sum(saved_sizes) != len(flat):
        raise ValueError(
            f"{file} holds state for {sum(saved_sizes)} parameters but the model has {len(flat)} trainable "
            f"parameters: it was saved for a different model or adapter configuration."
        )
    if len(saved_sizes) == 2 and saved_sizes != [len(g) for g in groups]:
        raise ValueError(
            f"{file} groups its parameters as {saved_sizes} (decay, no-decay) but Trainer would group this model's "
            f"as {[len(g) for g in groups]}: it was saved for a different model."
        )
    if len(saved_sizes) not in (1, 2):
        raise ValueError(
            f"{file} has {len(saved_sizes)} parameter groups; only the Trainer layout (decay and no-decay groups) "
            f"or a single group can be matched to the model's parameters."
        )
    if len(saved_sizes) == 1:
        flat = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    saved_indices = [index for group in saved["param_groups"] for index in group["params"]]
    for position, (index, (name, parameter)) in enumerate(zip(saved_indices, flat)):
        state = saved["state"].get(index)
        if state is None:
            continue  # a parameter that never received a gradient; affine_step reports it if it is tracked
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            raise ValueError(f"{file} is not an Adam/AdamW state: parameter {position} has keys {sorted(state)}.")
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(state[key].shape) != tuple(parameter.shape):
                raise ValueError(
                    f"{file}: state {key!r} of parameter {position} has shape {tuple(state[key].shape)} but the "
                    f"model's parameter {name!r} has shape {tuple(parameter.shape)}: the checkpoint was saved for a "
                    f"different model or adapter configuration."
                )

    start = 0
    param_groups = []
    for size, saved_group in zip(saved_sizes, saved["param_groups"]):
        params = [p for _, p in flat[start : start + size]]
        param_groups.append({"params": params, "weight_decay": saved_group.get("weight_decay", 0.0)})
        start += size
    optimizer = torch.optim.AdamW(param_groups, lr=float(saved["param_groups"][0].get("lr", 1e-3)))
    optimizer.load_state_dict(saved)
    return optimizer
