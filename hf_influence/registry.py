"""The registries of selection methods and of NN-CIFT oracles: each registers itself with what it can do.

A method is `function(context) -> MethodOutput` (engine.py); an oracle is a factory of `oracles.Oracle`. Their
capabilities are declared here, once, so that the engine, NN-CIFT, the trainer and the CLI ask the registry
instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the name `select_by_influence(method=...)` takes.
        function: `function(context) -> MethodOutput`.
        default_selection: the selection rule used when `selection` is not given, or a function of the run's
            configs ({config type: instance}) that returns it (NN-CIFT: the rule of its oracle's paper).
        needs_model: False for methods that score the raw rows without a model ("random").
        uses_stores: writes resumable stores into work_dir (a multi-process launch then needs a shared work_dir).
        robust_weights: returns robust per-row weights (selection="weighted", the trainer's weight mode).
        streams: may return its scores as a ScoreStream (never holding the [n, m] matrix) when asked.
        config_cls: the dataclass of the method's own options (PEFT's pattern), or None when it has none beyond
            the shared ones (SelectionConfig and the stage configs). Its flat keyword options are routed to it,
            and another method's options are refused by name (options.split_options).
    """

    name: str
    function: Callable
    default_selection: str | Callable[[dict[type, Any]], str]
    needs_model: bool = True
    uses_stores: bool = True
    robust_weights: bool = False
    streams: bool = False
    config_cls: type | None = None

    def selection_rule(self, configs: dict[type, Any]) -> str:
        """The rule this method selects with when `selection` is not given, for the run's configs."""
        return self.default_selection(configs) if callable(self.default_selection) else self.default_selection


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, default_selection: str | Callable[[dict[type, Any]], str], needs_model: bool = True,
                    uses_stores: bool = True, robust_weights: bool = False, streams: bool = False,
                    config_cls: type | None = None):
    """Register `function(context) -> MethodOutput` under `name` for `select_by_influence(method=name)`, with
    its capabilities and its own config dataclass (see MethodSpec)."""

    def decorator(function: Callable):
        METHODS[name] = MethodSpec(name, function, default_selection, needs_model, uses_stores, robust_weights,
                                   streams, config_cls)
        return function

    return decorator


@dataclass(frozen=True)
class OracleSpec:
    """A registered NN-CIFT oracle.

    Attributes:
        name: the name `NNCIFTConfig.oracle` takes.
        factory: `factory(config, model, tokenizer, optimizer, show_progress, **options) -> Oracle`, config the
            run's NNCIFTConfig; options are select_by_influence options (method oracles use them).
        selection: the rule of the oracle's paper, NN-CIFT's default selection with it.
        needs_model: whether it reads a loaded valuation model (the CLI then loads one), or a function of the
            NNCIFTConfig that says so.
    """

    name: str
    factory: Callable
    selection: str = "round_robin"
    needs_model: bool | Callable[[Any], bool] = True

    def requires_model(self, config) -> bool:
        """Whether this oracle reads a loaded valuation model under `config` (an NNCIFTConfig)."""
        return self.needs_model(config) if callable(self.needs_model) else self.needs_model


ORACLES: dict[str, OracleSpec] = {}


def register_oracle(name: str, selection: str = "round_robin", needs_model: bool | Callable[[Any], bool] = True):
    """Register `factory(config, model, tokenizer, optimizer, show_progress, **options) -> Oracle` under `name`
    for `NNCIFTConfig(oracle=name)`, with its paper's selection rule (see OracleSpec)."""

    def decorator(factory: Callable):
        ORACLES[name] = OracleSpec(name, factory, selection, needs_model)
        return factory

    return decorator


def oracle_rule(name: str | None) -> str:
    """The selection rule of oracle `name`'s paper; round-robin for an oracle this version does not know (a
    network from the Hub may name one)."""
    spec = ORACLES.get(name)
    return spec.selection if spec is not None else "round_robin"
