"""Influence oracles: block shapes and orientation, DELIFT against a one-pair-at-a-time computation, DELIFT-SE
against encode_rows, SelectIT's rating probabilities and scores, batching invariance and input errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_influence.testing import CHAT_ROWS
from datasets import Dataset

from hf_influence.rds_embeddings import cosine_scores
from hf_influence.networks.encoders import encode_rows, load_encoder
from hf_influence.formatting import FormattingConfig, FormattingError
from hf_influence.networks.oracles import DeliftOracle, DeliftSEOracle, Oracle, SelectITOracle
from hf_influence.registry import ORACLES
from hf_influence.testing import tiny_causal_lm

POOL = CHAT_ROWS
TARGETS = [
    {"prompt": "What is 12 plus 7?", "answer": "19"},
    {"prompt": "Which river flows through Paris?", "answer": "The Seine flows through Paris."},
    {"prompt": "Translate to French: the dog.", "answer": "Le chien."},
]


@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm("llama", seed=0)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


@pytest.fixture(scope="module")
def oracles(tiny, encoder):
    model, tokenizer = tiny
    return [
        DeliftSEOracle(encoder, show_progress=False),
        DeliftOracle(model, tokenizer, batch_size=4, show_progress=False),
        SelectITOracle(model, tokenizer, show_progress=False),
    ]


def response_distance(model, tokenizer, messages, distance="probability_l2"):
    """DELIFT's distance of the last turn, from one unpadded forward pass, the response located in the text, and
    each token's probability read from a softmax over the whole vocabulary, one token at a time."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)[None]).logits[0].double()
    # Token t is predicted by the logits at t - 1.
    probabilities = [torch.softmax(logits[t - 1], dim=-1)[ids[t]] for t, (start, _) in
                     enumerate(encoded["offset_mapping"]) if t > 0 and start >= len(prompt)]
    p = torch.stack(probabilities)
    if distance == "mean_nll":
        return -p.log().mean()
    return torch.linalg.vector_norm(p - 1) / len(p) ** 0.5  # DELIFT's ||p - 1||_2 / sqrt(T)


def response_nll(model, tokenizer, messages):
    return response_distance(model, tokenizer, messages, "mean_nll").float()


def test_shapes_and_orientation_of_every_oracle(oracles):
    for oracle in oracles:
        assert isinstance(oracle, Oracle)
        block = oracle.compute_block(POOL, TARGETS)
        columns = 1 if oracle.pointwise else len(TARGETS)
        assert block.shape == (len(POOL), columns), oracle.name
        assert block.dtype == torch.float32 and torch.isfinite(block).all()
        # Rows are pool rows, columns target rows: sub-blocks are slices of the full block.
        torch.testing.assert_close(oracle.compute_block(POOL[1:3], TARGETS), block[1:3], atol=1e-5, rtol=0)
        if not oracle.pointwise:
            torch.testing.assert_close(oracle.compute_block(POOL, TARGETS[2:]), block[:, 2:], atol=1e-5, rtol=0)
        json.dumps(oracle.identity())
        assert oracle.identity()["name"] == oracle.name


def test_pointwise_oracle_ignores_the_target(oracles):
    selectit = oracles[2]
    torch.testing.assert_close(selectit.compute_block(POOL, None), selectit.compute_block(POOL, TARGETS[:1]))


def test_delift_se_is_the_cosine_of_encode_rows(encoder, oracles):
    block = oracles[0].compute_block(POOL, TARGETS)
    expected = cosine_scores(encode_rows(POOL, encoder, show_progress=False),
                             encode_rows(TARGETS, encoder, show_progress=False))
    torch.testing.assert_close(block, expected, atol=1e-6, rtol=0)
    # The first pool row and the first target ask the same question.
    assert block[0].argmax() == 0


@pytest.mark.parametrize("distance", ["probability_l2", "mean_nll"])
def test_delift_equals_a_brute_force_pair_at_a_time(tiny, distance):
    model, tokenizer = tiny
    delift = DeliftOracle(model, tokenizer, batch_size=4, show_progress=False, distance=distance)
    block = delift.compute_block(POOL, TARGETS)
    expected = torch.empty(len(POOL), len(TARGETS), dtype=torch.float64)
    for j, target in enumerate(TARGETS):
        base = response_distance(model, tokenizer, delift.target_messages(target), distance)
        for i, example in enumerate(POOL):
            expected[i, j] = base - response_distance(model, tokenizer, delift.pair_messages(example, target), distance)
    torch.testing.assert_close(block, expected.float(), atol=1e-5, rtol=0)
    assert delift.identity()["distance"] == distance


def test_delift_default_distance_is_the_reference_codes():
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    assert DeliftOracle(model, tokenizer).distance == "probability_l2"
    with pytest.raises(ValueError, match="distance='l1'"):
        DeliftOracle(model, tokenizer, distance="l1")


def test_delift_prompt_layout():
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    delift = DeliftOracle(model, tokenizer, show_progress=False)
    target = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                           {"role": "assistant", "content": "Hello."}]}
    assert delift.pair_messages(POOL[2], target) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate to French: the cat sits on the mat."},
        {"role": "assistant", "content": "Le chat est assis sur le tapis."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert delift.target_messages(target) == target["messages"]


def test_delift_truncates_context_from_the_left(tiny):
    model, tokenizer = tiny
    delift = DeliftOracle(model, tokenizer, FormattingConfig(max_length=24), show_progress=False, distance="mean_nll")
    messages = delift.pair_messages(POOL[4], TARGETS[1])
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert len(encoded["input_ids"]) > 24
    ids = torch.tensor(encoded["input_ids"][-24:])
    in_response = torch.tensor([start >= len(prompt) for start, _ in encoded["offset_mapping"][-24:]])
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    expected = F.cross_entropy(logits[:-1][in_response[1:]], ids[1:][in_response[1:]])
    torch.testing.assert_close(delift.response_distances([messages])[0], expected, atol=1e-5, rtol=0)
    with pytest.raises(FormattingError, match="max_length=24"):
        DeliftOracle(model, tokenizer, FormattingConfig(max_length=24, truncation="error"),
                     show_progress=False).compute_block(POOL[4:], TARGETS[1:2])


def test_selectit_probabilities_match_single_row_forward_passes(tiny, oracles):
    model, tokenizer = tiny
    selectit = oracles[2]
    probabilities = selectit.rating_probabilities(POOL)
    assert probabilities.shape == (len(POOL), len(selectit.rating_prompts), 5)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(POOL), len(selectit.rating_prompts)))
    for i, row in enumerate(POOL):
        for p, prompt in enumerate(selectit.rating_prompts):
            ids = tokenizer(selectit.rating_text(row, prompt)[0], add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                next_token = model(**ids).logits[0, -1].softmax(-1)
            digits = next_token[[tokenizer.convert_tokens_to_ids(str(k)) for k in range(1, 6)]]
            torch.testing.assert_close(probabilities[i, p], digits / digits.sum(), atol=1e-5, rtol=0)
    scores = selectit.compute_block(POOL, TARGETS)
    assert ((scores >= 1) & (scores <= 5)).all()
    torch.testing.assert_close(scores[:, 0], (probabilities * torch.arange(1.0, 6.0)).sum(-1).mean(-1))


def test_selectit_paper_aggregation():
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    selectit = SelectITOracle(model, tokenizer, aggregation="selectit", alpha=0.2, show_progress=False)
    probabilities = torch.tensor([[[0.1, 0.2, 0.4, 0.2, 0.1], [0.0, 0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2]]])
    # Token level: (argmax + 1) * sum_k (P_max - P_k) / (K - 1), as in SelectIT's token_level.py.
    token_level = torch.tensor([3 * (0.3 + 0.2 + 0.0 + 0.2 + 0.3) / 4, 4 * (0.5 + 0.5 + 0.5 + 0 + 0) / 4, 0.0])
    expected = token_level.mean() / (1 + 0.2 * token_level.std(correction=0))
    torch.testing.assert_close(selectit.scores_from_probabilities(probabilities), expected.reshape(1, 1))
    scores = selectit.compute_block(POOL)
    assert scores.shape == (len(POOL), 1) and ((scores >= 0) & (scores <= 5)).all()


def test_selectit_truncates_the_response_end(tiny):
    model, tokenizer = tiny
    selectit = SelectITOracle(model, tokenizer, formatting=FormattingConfig(max_length=200), show_progress=False)
    row = {"prompt": "Say hi.", "answer": "hi " * 80}
    text, (start, end) = selectit.rating_text(row, selectit.rating_prompts[0])
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
    tail = tokenizer(text[end:], add_special_tokens=False)["input_ids"]
    assert len(head) + len(tail) < 200 < len(full)
    kept = selectit._tokenize(text, (start, end))["input_ids"]
    # The rating prompt, the instruction and the rating cue survive; the response loses its end.
    assert len(kept) == 200
    assert kept[: len(head)] == head and kept[-len(tail):] == tail
    assert kept[len(head) : -len(tail)] == full[len(head) : 200 - len(tail)]
    assert torch.isfinite(selectit.compute_block([row])).all()


def test_batching_invariance(tiny):
    model, tokenizer = tiny
    for oracle_class in (DeliftOracle, SelectITOracle):
        one = oracle_class(model, tokenizer, batch_size=1, show_progress=False).compute_block(POOL, TARGETS)
        many = oracle_class(model, tokenizer, batch_size=7, show_progress=False).compute_block(POOL, TARGETS)
        torch.testing.assert_close(many, one, atol=1e-5, rtol=0)


def test_dataset_inputs_match_list_inputs(oracles):
    for oracle in oracles:
        torch.testing.assert_close(oracle.compute_block(Dataset.from_list(POOL), Dataset.from_list(TARGETS)),
                                   oracle.compute_block(POOL, TARGETS), atol=1e-6, rtol=0)


def test_model_training_flag_is_restored(tiny):
    model, tokenizer = tiny
    model.train()
    try:
        DeliftOracle(model, tokenizer, show_progress=False).compute_block(POOL[:1], TARGETS[:1])
        SelectITOracle(model, tokenizer, show_progress=False).compute_block(POOL[:1])
        assert model.training
    finally:
        model.eval()


def test_empty_inputs_are_refused(oracles):
    for oracle in oracles:
        with pytest.raises(ValueError, match="at least one pool row"):
            oracle.compute_block([], TARGETS)
        if not oracle.pointwise:
            with pytest.raises(ValueError, match="at least one target row"):
                oracle.compute_block(POOL, [])


def test_rows_without_a_response_are_refused(oracles):
    no_answer = {"prompt": "Say hi.", "answer": ""}
    no_assistant = {"messages": [{"role": "user", "content": "Say hi."}]}
    for oracle in oracles:
        with pytest.raises(FormattingError, match=r"[Rr]ow 1"):
            oracle.compute_block([POOL[0], no_answer], TARGETS)
        if not oracle.pointwise:
            with pytest.raises(FormattingError, match=r"[Rr]ow 0"):
                oracle.compute_block(POOL, [no_assistant])


def test_invalid_settings_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="truncation"):
        DeliftOracle(model, tokenizer, FormattingConfig(truncation="drop"))
    with pytest.raises(ValueError, match="use_chat_template"):
        DeliftOracle(model, tokenizer, FormattingConfig(use_chat_template=False))
    with pytest.raises(ValueError, match="num_ratings"):
        SelectITOracle(model, tokenizer, num_ratings=10)
    with pytest.raises(ValueError, match="aggregation"):
        SelectITOracle(model, tokenizer, aggregation="mean")
    _, no_template = tiny_causal_lm("llama", chat_template=None)
    with pytest.raises(FormattingError, match="chat template"):
        SelectITOracle(model, no_template)
    plain = SelectITOracle(model, no_template, formatting=FormattingConfig(use_chat_template=False),
                           show_progress=False)
    assert plain.rating_text(TARGETS[0], "Rate it.")[0] == "Rate it.\n\nInstruction: What is 12 plus 7?\n\nResponse: 19\nThe answer is:\n"
    assert plain.compute_block(TARGETS).shape == (len(TARGETS), 1)


def test_method_oracle_is_the_methods_score_matrix():
    from hf_influence.testing import lora_model

    from hf_influence import select_by_influence
    from hf_influence.demo import demo_pool, demo_target
    from hf_influence.networks.oracles import MethodOracle

    pool, target = demo_pool(2, seed=0), demo_target("code", 3, seed=1)
    model, tokenizer = lora_model(seed=0)
    options = {"optimizer_state": "gd", "projection_dim": 256, "show_progress": False}
    oracle = MethodOracle("less", model=model, tokenizer=tokenizer, **options)
    block = oracle.compute_block(pool, target)
    assert block.shape == (len(pool), len(target)) and block.dtype == torch.float32
    _, table = select_by_influence(pool, target, model=model, tokenizer=tokenizer, budget=2, method="less",
                                   return_scores=True, **options)
    torch.testing.assert_close(block, table.to_matrix()[0])
    torch.testing.assert_close(oracle.compute_block(pool.select([3, 1]), target), block[[3, 1]])
    assert oracle.identity()["name"] == "less"
    with pytest.raises(ValueError, match="scoring method"):
        MethodOracle("random")
    with pytest.raises(TypeError, match="unknown option 'no_such_option'"):
        MethodOracle("less", no_such_option=1)


def test_method_oracle_keeps_each_block_in_its_own_work_dir_subfolder(tmp_path):
    from hf_influence.testing import lora_model

    from hf_influence.demo import demo_pool, demo_target
    from hf_influence.methods.nn_cift import oracle_options
    from hf_influence.options import split_options
    from hf_influence.networks.oracles import MethodOracle

    pool, target = demo_pool(2, seed=0), demo_target("code", 3, seed=1)
    model, tokenizer = lora_model(seed=0)
    options = {"optimizer_state": "gd", "projection_dim": 256, "show_progress": False}
    in_memory = MethodOracle("influence_distillation_exact", model=model, tokenizer=tokenizer, **options)
    stored = MethodOracle("influence_distillation_exact", model=model, tokenizer=tokenizer,
                          work_dir=str(tmp_path), **options)
    training, evaluation = pool.select([0, 2, 4]), pool.select([0, 1, 2, 5])
    first = [stored.compute_block(training, target), stored.compute_block(evaluation, target)]
    # Two blocks, two stores: one shared folder would hold the first block's gradients for the second block.
    assert len(list(tmp_path.glob("block-*"))) == 2
    torch.testing.assert_close(first[0], in_memory.compute_block(training, target))
    torch.testing.assert_close(first[1], in_memory.compute_block(evaluation, target))
    # A new oracle on the same folder reuses the finished stores and gives the same blocks.
    again = MethodOracle("influence_distillation_exact", model=model, tokenizer=tokenizer, work_dir=str(tmp_path),
                         **options)
    assert torch.equal(again.compute_block(evaluation, target), first[1])
    assert len(list(tmp_path.glob("block-*"))) == 2

    configs = split_options({"method": "nn_cift", "optimizer_state": "gd", "work_dir": "w", "selection_seed": 3,
                             "order": 2, "step_size": 0.1})
    passed = oracle_options(configs)
    assert passed["optimizer_state"] == "gd" and passed["work_dir"] == "w" and passed["selection_seed"] == 3
    assert passed["order"] == 2 and passed["step_size"] == 0.1  # the oracle method's own config
    assert not {"method", "selection", "target_task_column", "oracle", "block_fraction"} & set(passed)


# ---- the oracle registry: every registered oracle keeps one contract; a new one is one registration ----------


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_every_registered_oracle_keeps_the_contract(name, tiny):
    """make_oracle builds each registered oracle from its NNCIFTConfig; its blocks are float32 [pool, target]
    ([pool, 1] pointwise), finite, oriented (sub-blocks are slices), its identity names it, and its paper's rule is
    a selection rule."""
    from hf_influence.networks.nn_cift_pipeline import make_oracle
    from hf_influence.options import NNCIFTConfig
    from hf_influence.selection.rules import RULE_TABLE

    model, tokenizer = tiny
    spec = ORACLES[name]
    assert spec.name == name and spec.selection in RULE_TABLE
    options = {"optimizer_state": "gd", "projection_dim": 256, "num_blocks": 1, "jvp_projection_dim": 64}
    oracle = make_oracle(NNCIFTConfig(oracle=name), model, tokenizer, show_progress=False, **options)
    assert isinstance(oracle, Oracle) and oracle.name == name
    oracle.prepare(POOL)
    block = oracle.compute_block(POOL, TARGETS)
    assert block.shape == (len(POOL), 1 if oracle.pointwise else len(TARGETS))
    assert block.dtype == torch.float32 and torch.isfinite(block).all()
    torch.testing.assert_close(oracle.compute_block(POOL[1:3], TARGETS), block[1:3], atol=1e-5, rtol=0)
    oracle.release()
    assert json.loads(json.dumps(oracle.identity()))["name"] == name


def test_a_new_oracle_is_one_registration(monkeypatch):
    """A toy oracle registered in one place is accepted by NNCIFTConfig, built by make_oracle, distilled by
    nn_cift and selects by its declared rule; an unregistered name is refused naming the registered ones."""
    from hf_influence.demo import demo_pool, demo_target
    from hf_influence.networks.nn_cift_pipeline import nn_cift
    from hf_influence.options import NNCIFTConfig
    from hf_influence.registry import register_oracle

    class LengthOracle(Oracle):
        name, pointwise = "toy_length", False

        def _compute(self, pool_rows, target_rows):
            return torch.tensor([[float(len(json.dumps(p)) % 7 + len(json.dumps(t)) % 3) for t in target_rows]
                                 for p in pool_rows])

        def identity(self):
            return {"name": self.name, "pointwise": False}

    monkeypatch.setitem(ORACLES, "toy_length", None)  # so that the registration below is undone after the test
    register_oracle("toy_length", selection="mean_top_k", needs_model=False)(
        lambda config, model, tokenizer, optimizer, show_progress, **options: LengthOracle())
    config = NNCIFTConfig(oracle="toy_length", block_fraction=0.5, min_block_rows=8, network_epochs=5)
    result = nn_cift(demo_pool(4, seed=0), demo_target("math", 4, seed=1), config, show_progress=False)
    table = result.score_table(demo_pool(4, seed=0), demo_target("math", 4, seed=1), config)
    assert table.provenance["oracle"] == "toy_length" and table.provenance["selection"] == "mean_top_k"
    with pytest.raises(ValueError, match="must be one of .*'delift'"):
        NNCIFTConfig(oracle="toy_unregistered")
