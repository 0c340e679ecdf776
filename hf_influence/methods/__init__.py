"""The registered selection methods. Importing this package registers every one of them (registry.py), as
each module registers itself on import."""

from . import baselines, influence_distillation, nn_cift  # noqa: F401
