"""NN-CIFT as a selection method: an oracle scores a block of the pool, an InfluenceNetwork fitted on that block
predicts the rest (the work itself is `hf_influence.networks.nn_cift_pipeline.nn_cift`). A method oracle's own options (e.g.
order=2 for an Influence Distillation oracle) reach it through `oracle_options`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from ..engine import Context, MethodOutput
from ..networks.nn_cift_pipeline import block_overrides, nn_cift
from ..options import NNCIFTConfig, SelectionConfig
from ..registry import oracle_rule, register_method
from ..selection.streaming import ScoreStream

# SelectionConfig fields that describe the outer selection, not how a method oracle scores a block.
_NOT_ORACLE_FIELDS = ("method", "selection", "target_task_column")


def oracle_options(configs: dict[type, Any]) -> dict[str, Any]:
    """The options of a NN-CIFT method oracle: every config field except NNCIFTConfig's and the outer
    selection's own (method, selection rule, task column). The oracle method's own config (options.split_options
    builds it beside NNCIFTConfig), optimizer_state, selection_seed and work_dir (per-block subfolders, see
    MethodOracle) reach the oracle."""
    return {name: value for config_type, config in configs.items() if config_type is not NNCIFTConfig
            for name, value in asdict(config).items()
            if not (config_type is SelectionConfig and name in _NOT_ORACLE_FIELDS)}


def nn_cift_rule(configs: dict[type, Any]) -> str:
    """The selection rule of the NN-CIFT oracle's paper (registry.oracle_rule), for the run's configs."""
    return oracle_rule(configs.get(NNCIFTConfig, NNCIFTConfig()).oracle)


@register_method("nn_cift", default_selection=nn_cift_rule, streams=True, config_cls=NNCIFTConfig)
def nn_cift_method(context: Context) -> MethodOutput:
    """NN-CIFT: an oracle (NNCIFTConfig.oracle) on a u-block, an InfluenceNetwork fitted on it predicts the rest."""
    config = context.configs[NNCIFTConfig]
    # Leaving rows out is done on the score matrix, so the unseen-only selection does not stream.
    stream = context.stream_selection and not config.select_unseen_only
    result = nn_cift(context.raw_pool, context.raw_target, config, model=context.model,
                     tokenizer=context.tokenizer, optimizer=context.optimizer, predict=not stream,
                     **oracle_options(context.configs))
    context.seconds.update(result.seconds)
    details = {"block_rows": len(result.block_rows), "block_columns": len(result.block_columns),
               "evaluation": result.evaluation}
    block_mask = torch.zeros(len(context.pool), dtype=torch.bool)
    block_mask[result.block_rows] = True
    pointwise = result.network.kind == "pointwise"
    if stream:  # the network predicts chunk by chunk while selecting
        stream = ScoreStream(result.pool_embeddings, result.network,
                             block_overrides(result.block_rows, result.block_columns, result.block_labels, pointwise),
                             context.config.chunk_rows, None if pointwise else result.target_embeddings)
        return MethodOutput(None, landmark_mask=block_mask, stream=stream, pointwise=pointwise, details=details)
    return MethodOutput(result.scores, landmark_mask=block_mask, pointwise=pointwise, details=details,
                        selectable=~block_mask if config.select_unseen_only else None)
