"""hf-influence: pick the training data that helps a language model most on a target task.

Influence Distillation and NN-CIFT, native to the Hugging Face stack. Importing the package registers
`datasets.Dataset.select_by_influence` (an existing attribute of that name is never overwritten).
"""

from .extraction.distributed import fill_store, process_state
from .networks.encoders import extract_sentence_embeddings
from .engine import compute_scores
from .extraction.extract import extract_gradients, extract_jvp_embeddings
from .formatting import FormattedDataset, FormattingConfig, FormattingError, format_dataset, pad_batch
from .extraction.gradients import GradientConfig, GradientError, PerSampleGradients, per_sample_losses
from .extraction.hessian import TargetHessian
from .artifacts.hub import load_score_table, push_influence_network, push_score_table
from .influence import register_dataset_method, select_by_influence
from .extraction.jvp import JVPConfig, JVPEmbedder
from .selection.landmarks import LandmarkRegressor, select_landmarks
from .methods.influence_distillation_config import InfluenceDistillationConfig, InfluenceDistillationExactConfig
from .model_passes import target_loss
from .models import DEFAULT_MODEL, LoraSettings, add_lora, load_model
from .networks.network import InfluenceNetwork
from .networks.nn_cift_pipeline import NNCIFTConfig, NNCIFTResult, nn_cift
from .networks.pretrained import load_network, network_summary, select_with_network
from .optimizer_warmup import (CorruptWarmupError, WarmupConfig, WarmupMismatchError, WarmupResult, load_optimizer_state,
                               warmup)
from .optimizers import AffineStep, OptimizerStateError, affine_step
from .options import SelectionConfig
from .extraction.projection import make_projector
from .rds_embeddings import cosine_scores, lm_pooled_embeddings
from .registry import METHODS, ORACLES, register_method, register_oracle
from .selection.robust_weighting import robust_weights
from .artifacts.scores import ScoreTable, ScoreTableError
from .selection.rules import SelectionError, resolve_budget, select_indices, weighted_sample
from .extraction.store import StoreMismatchError, StoreSpec, VectorStore
from .selection.streaming import iter_scores, predict_scores, stream_select
from .targets import TARGET_TASKS, load_target
from .trainer import InfluenceSelection, InfluenceSFTTrainer
from .trainer_config import InfluenceSFTConfig

register_dataset_method()

__version__ = "0.5.0"

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "ORACLES",
    "TARGET_TASKS",
    "AffineStep",
    "FormattedDataset",
    "FormattingConfig",
    "FormattingError",
    "GradientConfig",
    "GradientError",
    "InfluenceNetwork",
    "InfluenceSFTConfig",
    "InfluenceSFTTrainer",
    "InfluenceSelection",
    "JVPConfig",
    "JVPEmbedder",
    "LandmarkRegressor",
    "LoraSettings",
    "NNCIFTConfig",
    "NNCIFTResult",
    "OptimizerStateError",
    "PerSampleGradients",
    "ScoreTable",
    "ScoreTableError",
    "SelectionConfig",
    "InfluenceDistillationConfig",
    "InfluenceDistillationExactConfig",
    "SelectionError",
    "StoreMismatchError",
    "StoreSpec",
    "TargetHessian",
    "VectorStore",
    "WarmupConfig",
    "WarmupMismatchError",
    "CorruptWarmupError",
    "WarmupResult",
    "add_lora",
    "affine_step",
    "compute_scores",
    "cosine_scores",
    "extract_gradients",
    "extract_jvp_embeddings",
    "extract_sentence_embeddings",
    "fill_store",
    "format_dataset",
    "iter_scores",
    "lm_pooled_embeddings",
    "load_model",
    "load_optimizer_state",
    "load_score_table",
    "load_target",
    "make_projector",
    "nn_cift",
    "pad_batch",
    "per_sample_losses",
    "load_network",
    "network_summary",
    "select_with_network",
    "predict_scores",
    "process_state",
    "push_influence_network",
    "push_score_table",
    "register_method",
    "register_oracle",
    "resolve_budget",
    "robust_weights",
    "select_by_influence",
    "select_indices",
    "select_landmarks",
    "stream_select",
    "target_loss",
    "warmup",
    "weighted_sample",
]
