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

import os
import sys

from ..errors import HFInfluenceError
from .network import run_fit_network, run_predict, run_push
from .select import run_demo, run_select
from .stores import run_embed, run_gradients
from .train import run_train

COMMANDS = {"demo": run_demo, "select": run_select, "fit-network": run_fit_network, "predict": run_predict,
            "push": run_push, "gradients": run_gradients, "embed": run_embed,
            "train": run_train}


# What a user's input, options or files can raise: one line, exit code 2. Anything else is a bug and keeps its
# traceback.
USER_ERRORS = (HFInfluenceError, ValueError, KeyError, OSError)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `hf-influence` console script. A user error (a bad option, row, file or store) ends it
    with one line on stderr and exit code 2; `--debug` (anywhere) or HF_INFLUENCE_DEBUG=1 shows the traceback.
    Returns None: the console script exits with `sys.exit(main())`, which would print any other value and exit
    with code 1 (the commands' results are in their output folders; `run_<command>` returns them in Python)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("HF_INFLUENCE_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\nRun `hf-influence COMMAND --help` for the options of a command; --debug shows tracebacks.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hf-influence: error: Unknown command {argv[0]!r}: choose from {', '.join(COMMANDS)}.",
                  file=sys.stderr)
            raise SystemExit(2)
        return None
    try:
        COMMANDS[argv[0]](argv[1:])
        return None
    except SystemExit as stop:
        if not isinstance(stop.code, str) or debug:  # argparse (exit 2 already), --help (0), or --debug
            raise
        message = stop.code
    except USER_ERRORS as error:
        if debug:
            raise
        message = f"{type(error).__name__}: {error}"
    print(f"hf-influence {argv[0]}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
