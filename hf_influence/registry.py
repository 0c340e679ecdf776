"""The registry of selection methods: each method module registers itself with what it can do.

A method is `function(context) -> MethodOutput` (engine.py). Its capabilities are declared here, once, so that
the engine, the trainer and the CLI ask the registry instead of comparing method names.
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
        second_order: honours order=2, or a function of the run's configs that says whether it does (NN-CIFT:
            through its oracle); other methods refuse it before any model pass.
        streams: may return its scores as a ScoreStream (never holding the [n, m] matrix) when asked.
    """

    name: str
    function: Callable
    default_selection: str | Callable[[dict[type, Any]], str]
    needs_model: bool = True
    uses_stores: bool = True
    robust_weights: bool = False
    second_order: bool | Callable[[dict[type, Any]], bool] = False
    streams: bool = False

    def has_second_order(self, configs: dict[type, Any]) -> bool:
        """Whether this method honours order=2 for the run's configs."""
        return self.second_order(configs) if callable(self.second_order) else self.second_order

    def selection_rule(self, configs: dict[type, Any]) -> str:
        """The rule this method selects with when `selection` is not given, for the run's configs."""
        return self.default_selection(configs) if callable(self.default_selection) else self.default_selection


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, default_selection: str | Callable[[dict[type, Any]], str], needs_model: bool = True, uses_stores: bool = True,
                    robust_weights: bool = False, second_order: bool | Callable[[dict[type, Any]], bool] = False,
                    streams: bool = False):
    """Register `function(context) -> MethodOutput` under `name` for `select_by_influence(method=name)`, with
    its capabilities (see MethodSpec)."""

    def decorator(function: Callable):
        METHODS[name] = MethodSpec(name, function, default_selection, needs_model, uses_stores, robust_weights,
                                   second_order, streams)
        return function

    return decorator
