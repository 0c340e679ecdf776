"""The contract every registered method keeps (as PEFT's common tester does for its tuners), run over the
registry, so that a new method is held to it as soon as it registers: one score row per pool row, the same
result for the same seed, streaming exactly when it declares it, a clear refusal of what it cannot do, and the
user's model given back as it was."""

import dataclasses

import pytest
import torch
from hf_influence.testing import lora_model

from hf_influence import METHODS, compute_scores, select_by_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.selection.streaming import ScoreStream
from hf_influence.options import SHARED_CONFIG_TYPES, config_types, method_config_types, split_options
from hf_influence.testing import tiny_causal_lm

FAST = {"num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "warmup_show_progress": False,
        "show_progress": False, "projection_dim": 256, "jvp_projection_dim": 128}
# The smallest settings that run each method on the tiny model. A newly registered method fails
# test_every_method_is_covered until it is given its entry here.
METHOD_OPTIONS = {
    "influence_distillation": {"num_landmarks": 8},
    "influence_distillation_exact": {},
    "less": {},
    "rds": {},
    "random": {},
    "nn_cift": {"oracle": "less", "block_fraction": 0.4, "min_block_rows": 8, "network_epochs": 3,
                "optimizer_state": "gd"},
}


@pytest.fixture(scope="module")
def rows():
    return demo_pool(5, seed=0), demo_target("math", 3, seed=1)  # 20 pool rows, 3 target rows


def _options(method, **extra):
    return {**FAST, **METHOD_OPTIONS[method], "method": method, **extra}


def test_every_method_is_covered():
    assert set(METHOD_OPTIONS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_takes_its_own_options_and_refuses_every_other_methods_by_name(method):
    """PEFT's pattern: a method's options live in the config class it registers with. Its own options and the
    shared ones build that config; an option only another method reads is a TypeError naming its config."""
    own = method_config_types(method, METHOD_OPTIONS[method].get("oracle"))
    configs = split_options({**METHOD_OPTIONS[method], "method": method})
    assert set(configs) == {*SHARED_CONFIG_TYPES, *own}
    mine = {f.name for config in (*SHARED_CONFIG_TYPES, *own) for f in dataclasses.fields(config)}
    foreign = {f.name: config for config in config_types() for f in dataclasses.fields(config) if f.name not in mine}
    assert foreign
    for name, config in foreign.items():
        value = getattr(config(), name)
        with pytest.raises(TypeError, match=f"'{name}' is an option of .*which method '{method}'"):
            split_options({**METHOD_OPTIONS[method], "method": method, name: value})


def test_a_toy_method_with_its_own_config_is_one_registration(rows, monkeypatch, capsys):
    """Adding a method is one decorated function and its config class: select_by_influence routes the method's
    option to it, every other method refuses that option by name, and the CLI's --help shows its group."""
    from hf_influence import cli
    from hf_influence.engine import MethodOutput
    from hf_influence.registry import register_method

    @dataclasses.dataclass
    class ToyLengthConfig:
        _argument_group_name = "toy (ToyLengthConfig)"
        length_power: float = dataclasses.field(default=1.0, metadata={"help": "score = prompt length ** power"})

    monkeypatch.setitem(METHODS, "toy_length", None)  # so that the registration below is undone after the test

    @register_method("toy_length", default_selection="mean_top_k", needs_model=False, uses_stores=False,
                     config_cls=ToyLengthConfig)
    def toy_length(context):
        lengths = torch.tensor([float(len(str(row))) for row in context.pool], dtype=torch.float32)
        return MethodOutput((lengths ** context.method_config.length_power)[:, None])

    pool, target = rows
    selected, table = select_by_influence(pool, target, budget=3, method="toy_length", length_power=2.0,
                                          return_scores=True)
    longest = sorted(range(len(pool)), key=lambda i: (-len(str(pool[i])), i))[:3]
    assert [pool["id"].index(row) for row in selected["id"]] == longest
    assert table.provenance["configs"]["ToyLengthConfig"] == {"length_power": 2.0}
    with pytest.raises(TypeError, match="'length_power' is an option of ToyLengthConfig \\(method toy_length\\)"):
        split_options({"method": "random", "length_power": 2.0})
    with pytest.raises(SystemExit):
        cli.main(["select", "--method", "toy_length", "--help"])
    assert "toy (ToyLengthConfig)" in capsys.readouterr().out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_score_row_per_pool_row_and_deterministic_for_a_seed(rows, method):
    pool, target = rows
    runs = []
    for _ in range(2):
        model, tokenizer = lora_model(seed=0)
        runs.append(compute_scores(pool, target, model=model, tokenizer=tokenizer,
                                   **_options(method, selection_seed=3)))
    first, second = runs
    assert first.pool_row_ids == list(range(len(pool)))
    assert first.output.scores.shape[0] == len(pool)
    assert first.output.scores.shape[1] in (1, len(target))
    assert torch.equal(first.output.scores, second.output.scores)
    if METHODS[method].robust_weights:
        assert first.output.weights.shape == (len(pool),) and torch.equal(first.output.weights, second.output.weights)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_streams_exactly_when_declared_and_selects_the_same_rows(rows, method, monkeypatch):
    pool, target = rows
    model, tokenizer = lora_model(seed=0)
    selected, _ = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5, return_scores=True,
                                      **_options(method))
    streamed_calls = []
    select = ScoreStream.select

    def counting(self, *args, **kwargs):
        streamed_calls.append(1)
        return select(self, *args, **kwargs)

    monkeypatch.setattr(ScoreStream, "select", counting)
    model, tokenizer = lora_model(seed=0)
    again = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5, **_options(method))
    assert again["id"] == selected["id"]
    assert bool(streamed_calls) == METHODS[method].streams


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.slow
def test_does_what_it_declares_and_refuses_the_rest(rows, method):
    """Weighted selection and order 2 work exactly for the methods registered with robust weights and with an
    `order` option in their config (NN-CIFT: its oracle method's), and are refused, before any model pass, for
    the others: order=2 as another method's option, named."""
    pool, target = rows
    model, tokenizer = lora_model(seed=0)
    weighted = _options(method, selection="weighted")
    if METHODS[method].robust_weights:
        selected, table = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5,
                                              return_scores=True, **weighted)
        assert len(set(selected["id"])) == 5 and bool(torch.isfinite(table.weights).all())
    else:
        with pytest.raises(ValueError, match="selection='weighted' needs robust weights"):
            select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5, **weighted)
    second = _options(method, order=2, step_size=1e-3)
    own = method_config_types(method, METHOD_OPTIONS[method].get("oracle"))  # NN-CIFT: its oracle's (LESS: none)
    if any("order" in {f.name for f in dataclasses.fields(config)} for config in own):
        _, first_order = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5,
                                             return_scores=True, **{**second, "order": 1})
        _, second_order = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5,
                                              return_scores=True, **second)
        assert not torch.equal(second_order.weights, first_order.weights)  # the second-order term changed them
    else:
        with pytest.raises(TypeError, match="'order' is an option of InfluenceDistillationExactConfig"):
            select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5, **second)


@pytest.mark.parametrize("kind", ["base", "peft"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gives_the_users_model_back_as_it_was(rows, method, kind):
    """A base model loses the adapter added for the run and keeps its requires_grad flags; a PEFT model's
    adapter weights (which the warm-up trains) are put back."""
    pool, target = rows
    model, tokenizer = tiny_causal_lm(seed=0) if kind == "base" else lora_model(seed=0)
    if kind == "base":
        model.lm_head.weight.requires_grad_(False)  # a user's own choice, which the run must keep
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=5, **_options(method))
    assert set(model.state_dict()) == set(state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags
    assert hasattr(model, "peft_config") == (kind == "peft")
