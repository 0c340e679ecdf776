"""hf-influence: pick the training data that helps a language model most on a target task.

Influence Distillation and NN-CIFT, native to the Hugging Face stack. The foundation layer is here:
formatting, model loading, per-sample LoRA gradients, projections, JVP embeddings and resumable stores.
"""

from .extract import extract_gradients, extract_jvp_embeddings
from .formatting import FormattedDataset, FormattingConfig, FormattingError, format_dataset, pad_batch
from .gradients import GradientConfig, GradientError, PerSampleGradients, per_sample_losses
from .jvp import JVPConfig, JVPEmbedder
from .models import DEFAULT_MODEL, LoraSettings, add_lora, load_model
from .optimizers import AffineStep, OptimizerStateError, affine_step
from .projection import make_projector
from .store import StoreMismatchError, StoreSpec, VectorStore

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AffineStep",
    "FormattedDataset",
    "FormattingConfig",
    "FormattingError",
    "GradientConfig",
    "GradientError",
    "JVPConfig",
    "JVPEmbedder",
    "LoraSettings",
    "OptimizerStateError",
    "PerSampleGradients",
    "StoreMismatchError",
    "StoreSpec",
    "VectorStore",
    "add_lora",
    "affine_step",
    "extract_gradients",
    "extract_jvp_embeddings",
    "format_dataset",
    "load_model",
    "make_projector",
    "pad_batch",
    "per_sample_losses",
]
