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

import sys

from .network import run_fit_network, run_predict, run_push
from .select import run_demo, run_select
from .stores import run_embed, run_gradients
from .train import run_train

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
