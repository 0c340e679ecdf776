"""`python -m hf_influence.cli` (and `accelerate launch -m hf_influence.cli`): the hf-influence console script."""

from . import main

main()
