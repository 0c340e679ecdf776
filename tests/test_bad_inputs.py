"""Bad inputs, table-driven: each case asserts the exception type (API) or exit code 2 and a one-line message
(CLI), and the words that name the culprit (the option, row, column or file). On the tiny model, offline."""

import json

import pytest
import torch
from datasets import Dataset, DatasetDict

from hf_influence import InfluenceNetwork, NNCIFTConfig, ScoreTable, cli, select_by_influence
from hf_influence.demo import demo_pool, demo_target
from hf_influence.errors import HFInfluenceError
from hf_influence.formatting import FormattingConfig
from hf_influence.extraction.gradients import GradientConfig
from hf_influence.optimizer_warmup import WarmupConfig
from hf_influence.networks.oracles import DeliftOracle
from hf_influence.testing import lora_model, tiny_causal_lm

POOL = demo_pool(2, seed=0).to_list()  # 8 chat rows
TARGET = [{"prompt": "What is 2 + 3?", "completion": "5"}]
GOOD = {"prompt": "What is 1 + 1?", "completion": "2"}


@pytest.fixture(scope="module")
def model():
    return lora_model(seed=0)


def _select(model, pool=POOL, target=TARGET, budget=2, **options):
    return select_by_influence(pool, target, model=model[0], tokenizer=model[1], budget=budget,
                               show_progress=False, **options)


def _grown_tokenizer(tokenizer):
    """A copy of `tokenizer` with a token the model has no embedding for (as another model's tokenizer would)."""
    import copy

    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["zebrafish"])
    return grown


def _edited_network_config(**changes) -> str:
    """A saved InfluenceNetwork folder whose config.json says other sizes or another kind than its weights."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="edited_network_"))
    InfluenceNetwork(embedding_dim=4, hidden_sizes=(4,)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return str(folder)


def _broken_network(part: str) -> str:
    """A saved InfluenceNetwork folder with its config.json or its weights file replaced by junk."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="broken_network_"))
    InfluenceNetwork(embedding_dim=4, hidden_sizes=(4,)).save_pretrained(folder)
    (folder / ("config.json" if part == "config" else "model.safetensors")).write_bytes(b"{not json or tensors")
    return str(folder)


API_CASES = [
    # (id, call(model), exception type, words of the message)
    ("empty pool", lambda m: _select(m, pool=[]), HFInfluenceError, "pool is empty"),
    ("empty target", lambda m: _select(m, target=[]), HFInfluenceError, "target is empty"),
    ("budget 0", lambda m: _select(m, budget=0), HFInfluenceError, "budget must be at least 1"),
    ("budget share above 1", lambda m: _select(m, budget=1.5), HFInfluenceError, "budget fraction must be in (0, 1], got 1.5"),
    ("budget not a number", lambda m: _select(m, budget="abc"), HFInfluenceError, "budget must be an int count or a float fraction, got 'abc'"),
    ("budget above the pool", lambda m: _select(m, budget=50), HFInfluenceError, "budget 50 is larger than the pool (8 rows)"),
    ("unknown option", lambda m: _select(m, num_landmark=4), TypeError,
     "unknown option 'num_landmark' (did you mean 'num_landmarks' of InfluenceDistillationConfig?)"),
    ("another method's option", lambda m: _select(m, method="rds", num_landmarks=4), TypeError,
     "'num_landmarks' is an option of InfluenceDistillationConfig (method influence_distillation), which method "
     "'rds' does not read"),
    ("unknown method", lambda m: _select(m, method="nope"), ValueError, "SelectionConfig.method"),
    ("scores and details", lambda m: _select(m, return_scores=True, return_details=True), ValueError,
     "return_scores and return_details: pass one"),
    ("unknown rule", lambda m: _select(m, selection="nope"), ValueError, "SelectionConfig.selection"),
    ("num_landmarks 0", lambda m: _select(m, num_landmarks=0), ValueError, "num_landmarks must be an integer >= 1, got 0"),
    ("num_landmarks 4.7", lambda m: _select(m, num_landmarks=4.7), ValueError,
     "InfluenceDistillationConfig.num_landmarks must be an integer >= 1, got 4.7"),
    ("num_landmarks None", lambda m: _select(m, num_landmarks=None), ValueError,
     "InfluenceDistillationConfig.num_landmarks must be an integer >= 1, got None"),
    ("num_landmarks True", lambda m: _select(m, num_landmarks=True), ValueError, "must be an integer >= 1, got True"),
    ("selection_seed a string", lambda m: _select(m, selection_seed="0"), ValueError,
     "SelectionConfig.selection_seed must be an integer, got '0'"),
    ("exact_gradient_fraction a string", lambda m: _select(m, exact_gradient_fraction="0.2"), ValueError,
     "InfluenceDistillationConfig.exact_gradient_fraction must be a finite number or None, got '0.2'"),
    ("kernel_ridge nan", lambda m: _select(m, kernel_ridge=float("nan")), ValueError,
     "kernel_ridge must be a finite number or None, got nan"),
    ("negative shortlist", lambda m: _select(m, shortlist_factor=-1), ValueError, "shortlist_factor must be >= 0"),
    ("negative ridge", lambda m: _select(m, kernel_ridge=-1.0), ValueError, "kernel_ridge must be >= 0"),
    ("robust lambda 0", lambda m: _select(m, robust_lambda=0.0), ValueError,
     "InfluenceDistillationConfig.robust_lambda must be a finite number in (0, inf], got 0.0"),
    ("order 2 without a second-order term", lambda m: _select(m, method="less", order=2), TypeError,
     "'order' is an option of InfluenceDistillationExactConfig"),
    ("weighted rule without weights", lambda m: _select(m, method="less", selection="weighted"), ValueError,
     "needs robust weights"),
    ("a tokenizer that is not the model's", lambda m: select_by_influence(
        [*POOL, {**POOL[0], "messages": [{"role": "user", "content": "A zebrafish?"},
                                          {"role": "assistant", "content": "Yes."}]}], TARGET, model=m[0], tokenizer=_grown_tokenizer(m[1]),
        budget=2, show_progress=False), ValueError,
     "The tokenizer does not fit the model: pool row 8 has token id 509, and the model's input embedding has 509 "
     "rows"),
    ("a network config with other sizes", lambda m: InfluenceNetwork.from_pretrained(
        _edited_network_config(hidden_sizes=[8])), HFInfluenceError,
     "do not fit the network its config.json describes ({'kind': 'pairwise', 'embedding_dim': 4, 'hidden_sizes': [8]"),
    ("a network config of another kind", lambda m: InfluenceNetwork.from_pretrained(
        _edited_network_config(kind="pointwise")), HFInfluenceError, "size mismatch for hidden.0.weight"),
    ("projection_dim 4.5", lambda m: _select(m, projection_dim=4.5), ValueError,
     "GradientConfig.projection_dim must be an integer >= 1, got 4.5"),
    ("jvp_projection_dim None", lambda m: _select(m, jvp_projection_dim=None), ValueError,
     "JVPConfig.jvp_projection_dim must be an integer >= 1, got None"),
    ("max_length 2.5", lambda m: _select(m, max_length=2.5), ValueError,
     "FormattingConfig.max_length must be an integer, got 2.5"),
    ("lora_r 0", lambda m: _select(m, lora_r=0), ValueError, "LoraSettings.lora_r must be an integer >= 1, got 0"),
    ("lora_dropout 1.5", lambda m: _select(m, lora_dropout=1.5), ValueError,
     "LoraSettings.lora_dropout must be a number in [0, 1), got 1.5"),
    ("network_epochs 2.5", lambda m: NNCIFTConfig(network_epochs=2.5), ValueError,
     "NNCIFTConfig.network_epochs must be an integer >= 1, got 2.5"),
    ("block_fraction a string", lambda m: NNCIFTConfig(block_fraction="half"), ValueError,
     "NNCIFTConfig.block_fraction must be a finite number in (0, 1], got 'half'"),
    ("a one-row pool for landmark ID", lambda m: _select(m, pool=[GOOD], budget=1, num_blocks=1), ValueError,
     "needs at least 2 landmarks for its regression; this run has 1 (1 usable pool rows, num_landmarks=4096): use "
     "method='influence_distillation_exact' on a pool this small"),
    ("one landmark", lambda m: _select(m, num_landmarks=1, num_blocks=1), ValueError,
     "raise num_landmarks to at least 2"),
    ("a lone surrogate in a row", lambda m: _select(m, pool=[*POOL[:2], {**POOL[2], "source": "bad \ud800"}]),
     HFInfluenceError, "The pool's row 2, column 'source', holds text that is not valid Unicode"),
    ("pool a DatasetDict", lambda m: _select(m, pool=DatasetDict(train=Dataset.from_list(POOL))), HFInfluenceError,
     "The pool is a DatasetDict with splits ['train']: pass one split, e.g. rows['train']."),
    ("target a streamed dataset", lambda m: _select(m, target=Dataset.from_list(TARGET).to_iterable_dataset()),
     HFInfluenceError, "The target is a streamed IterableDataset: selection needs the row count and random access"),
    ("target None", lambda m: _select(m, target=None), HFInfluenceError,
     "The target must be a datasets.Dataset, a list of row dicts, or a file, folder or Hub dataset id; got NoneType"),
    ("target a number", lambda m: Dataset.from_list(POOL).select_by_influence(12345, model=m[0], tokenizer=m[1],
                                                                               budget=2),
     HFInfluenceError, "got int"),
    ("pool row not a dict", lambda m: _select(m, pool=[*POOL[:3], "a row"]), HFInfluenceError,
     "The pool's row 3 is a str, not a dict of columns"),
    ("conversational prompt with a string completion", lambda m: _select(m, target=[
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4"}]), HFInfluenceError,
     "'prompt' and 'completion' must both be strings or both lists of messages"),
    ("model_init_kwargs with device and device_map", lambda m: _select(m, model_init_kwargs={
        "device": "cpu", "device_map": "auto"}), ValueError, "model_init_kwargs has both 'device' and 'device_map'"),
    ("model_init_kwargs with the old torch_dtype", lambda m: _select(m, model_init_kwargs={"torch_dtype": "auto"}),
     ValueError, "model_init_kwargs has 'torch_dtype', transformers' old name of 'dtype'"),
    ("model_init_kwargs with a dtype torch lacks", lambda m: _select(m, model_init_kwargs={"dtype": "float17"}),
     ValueError, "model_init_kwargs['dtype'] must name a torch dtype (e.g. 'bfloat16') or be 'auto', got 'float17'"),
    ("model_init_kwargs with a model object", lambda m: _select(m, model_init_kwargs={"dtype": "float16"}),
     ValueError, "model is an object"),
    ("more JVP blocks than the model has", lambda m: _select(m, num_blocks=4), ValueError,
     "JVPConfig.num_blocks=4: the model has 2 decoder blocks"),
    ("more hidden-state blocks than the model has", lambda m: _select(m, landmark_features="hidden_state"),
     ValueError, "InfluenceDistillationConfig.hidden_state_blocks=8: the model has 2 decoder blocks"),
    ("unknown hidden-state pooling", lambda m: _select(m, landmark_features="hidden_state", hidden_state_blocks=1,
                                                       hidden_state_pooling="max"), ValueError,
     "hidden_state_pooling"),
    ("row of an unknown format", lambda m: _select(m, pool=[{"question": "x"}] + POOL), HFInfluenceError,
     "Cannot tell the row format"),
    ("target row with an empty response", lambda m: _select(m, target=[{"prompt": "x", "completion": " "}]),
     HFInfluenceError, "0 (no_label_tokens)"),
    ("bad truncation", lambda m: FormattingConfig(truncation="cut"), ValueError, "truncation='cut'"),
    ("bad warm-up share", lambda m: WarmupConfig(warmup_fraction=0), ValueError, "warmup_fraction must be in"),
    ("bad gradient parameters", lambda m: GradientConfig(parameters="all"), ValueError, "parameters='all'"),
    ("unknown NN-CIFT oracle", lambda m: NNCIFTConfig(oracle="nope"), ValueError, "NNCIFTConfig.oracle"),
    ("swapped label range", lambda m: InfluenceNetwork(embedding_dim=4, label_min=1.0, label_max=0.0), ValueError,
     "label_min and label_max"),
    ("unknown network kind", lambda m: InfluenceNetwork(kind="triple"), ValueError, "kind must be one of"),
    ("pointwise bilinear network", lambda m: InfluenceNetwork(kind="pointwise", interaction_rank=2), ValueError,
     "interaction_rank"),
    ("NaN score", lambda m: ScoreTable.from_matrix(torch.tensor([[float("nan")]]), [0], ["t"]), HFInfluenceError,
     "pool row id 0, target 't'"),
    ("DELIFT distance", lambda m: DeliftOracle(*tiny_causal_lm("llama", seed=0), distance="l1"), ValueError,
     "distance='l1'"),
    ("missing network folder", lambda m: __import__("hf_influence").load_network("./no/such/network"),
     FileNotFoundError, "no/such/network"),
    ("unknown target task", lambda m: __import__("hf_influence").load_target("gsm9k"), KeyError,
     "unknown target task 'gsm9k'"),
    ("missing local model folder", lambda m: select_by_influence(POOL, TARGET, model="./no/such/model", budget=2),
     HFInfluenceError, "Model folder './no/such/model' does not exist (a local path, not a Hub id)"),
    ("model neither local nor cached", lambda m: select_by_influence(POOL, TARGET, model="nobody/no-such-model",
                                                                     budget=2),
     HFInfluenceError, "Could not load model 'nobody/no-such-model'"),
    ("missing network folder by from_pretrained", lambda m: InfluenceNetwork.from_pretrained("./no/such/network"),
     FileNotFoundError, "InfluenceNetwork folder './no/such/network' does not exist"),
    ("network config that is not JSON", lambda m: InfluenceNetwork.from_pretrained(_broken_network("config")),
     ValueError, "config.json is not valid JSON"),
    ("network weights that are not safetensors", lambda m: InfluenceNetwork.from_pretrained(
        _broken_network("weights")), ValueError, "model.safetensors is not a readable safetensors file"),
    ("target task offline without data_dir", lambda m: __import__("hf_influence").load_target("gsm8k"),
     HFInfluenceError, "pass data_dir= (or set $HF_INFLUENCE_DATA_DIR) to a folder holding targets/gsm8k_train"),
    ("score table folder that is not one", lambda m: ScoreTable.load("."), HFInfluenceError, "is not a score table"),
]


def test_too_many_jvp_blocks_are_refused_before_the_warm_up(model, monkeypatch):
    from hf_influence.methods import stores

    def no_warm_up(*args, **kwargs):
        raise AssertionError("the warm-up ran before num_blocks was checked")

    monkeypatch.setattr(stores, "warmup", no_warm_up)
    with pytest.raises(ValueError, match="JVPConfig.num_blocks=4: the model has 2 decoder blocks"):
        _select(model, num_blocks=4)
    with pytest.raises(ValueError, match="hidden_state_blocks=3: the model has 2 decoder blocks"):
        _select(model, landmark_features="hidden_state", hidden_state_blocks=3)


@pytest.mark.parametrize(("call", "error", "words"), [case[1:] for case in API_CASES],
                         ids=[case[0] for case in API_CASES])
def test_api_refuses_bad_input_naming_the_culprit(model, call, error, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a refused call writes by a relative path would land here
    before = _model_state(*model)
    with pytest.raises(error) as raised:
        call(model)
    assert words in str(raised.value)
    assert _model_state(*model) == before  # the caller's model and tokenizer as they were
    assert list(tmp_path.iterdir()) == []


FAST = {"num_blocks": 1, "warmup_fraction": 0.25, "warmup_min_steps": 2, "projection_dim": 256,
        "jvp_projection_dim": 128}


@pytest.mark.parametrize("peft", [False, True], ids=["base model", "PEFT model"])
@pytest.mark.parametrize("method", ["influence_distillation", "influence_distillation_exact", "less", "rds"])
def test_a_selection_leaves_the_callers_model_and_tokenizer_as_they_were(method, peft):
    # The warm-up's Trainer turns use_cache off and aligns the config's special tokens; the LoRA adapter of a base
    # model is added and removed; a PEFT model's adapter is trained by the warm-up: all of it is put back.
    model, tokenizer = lora_model(seed=0) if peft else tiny_causal_lm("llama", seed=0)
    model.train()
    before = _model_state(model, tokenizer)
    vocabulary = (tokenizer.get_vocab(), tokenizer.chat_template, tokenizer.padding_side)
    landmarks = {"num_landmarks": 4} if method == "influence_distillation" else {}
    select_by_influence(POOL, TARGET, model=model, tokenizer=tokenizer, budget=2, method=method, show_progress=False,
                        **FAST, **landmarks)
    assert _model_state(model, tokenizer) == before
    assert (tokenizer.get_vocab(), tokenizer.chat_template, tokenizer.padding_side) == vocabulary


def _model_state(model, tokenizer) -> tuple:
    """What a call could change on the caller's model and tokenizer: weights, trainable flags, config,
    training mode, special tokens."""
    weights = tuple((name, p.detach().clone().numpy().tobytes(), p.requires_grad) for name, p in model.named_parameters())
    return weights, model.config.to_json_string(), model.training, json.dumps(tokenizer.special_tokens_map,
                                                                              sort_keys=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(3)))
    (folder / "a_file").write_text("x")
    (folder / "bad.yaml").write_text("num_landmark: 4\n")
    (folder / "fractional.yaml").write_text("num_landmarks: 4.7\n")
    (folder / "null.yaml").write_text("num_landmarks: null\n")
    (folder / "malformed.jsonl").write_text(json.dumps(GOOD) + "\n" + '{"prompt": "x", "completion": \n' + json.dumps(GOOD) + "\n")
    (folder / "empty.jsonl").write_text("\n")
    (folder / "earlier_fit").mkdir()
    (folder / "earlier_fit" / "notes.txt").write_text("mine")
    return folder


CLI_CASES = [
    # (id, argv (FOLDER is the files fixture), words of the one-line message)
    ("select: an int option given a float", ["select", "--num_landmarks", "2.5"],
     "argument --num_landmarks/--num-landmarks: invalid int value: '2.5'"),
    ("train: an unknown flag", ["train", "--bogus", "1"], "unrecognised arguments: --bogus 1"),
    ("select: group_depth 0", ["select", "--group_depth", "0"], "--group_depth must be at least 1, got 0"),
    ("select: group_depth -1", ["select", "--group_depth", "-1"], "--group_depth must be at least 1, got -1"),
    ("select: top -1", ["select", "--top", "-1"], "--top must be at least 0, got -1"),
    ("select: pool_limit 0", ["select", "--pool_limit", "0"], "--pool_limit must be at least 1, got 0"),
    ("train: pool_sample 0", ["train", "--pool_sample", "0"], "--pool_sample must be at least 1, got 0"),
    ("gradients: limit -3", ["gradients", "--limit", "-3"], "--limit must be at least 1, got -3"),
    ("select without a pool", ["select", "--target", "FOLDER/rows.jsonl"], "--pool and --target are required"),
    ("select: budget not a number", ["select", "--pool", "FOLDER/rows.jsonl", "--target", "FOLDER/rows.jsonl",
                                     "--budget", "two"], "'two'"),
    ("select: missing pool file", ["select", "--pool", "FOLDER/missing.jsonl", "--target", "FOLDER/rows.jsonl",
                                   "--output", "FOLDER/out1"], "missing.jsonl"),
    ("select: abbreviated flag", ["select", "--num_land", "4"], "unknown option 'num_land' (did you mean 'num_landmarks'"),
    ("select: unknown YAML key", ["select", "--config", "FOLDER/bad.yaml"], "unknown option 'num_landmark'"),
    ("select: YAML num_landmarks 4.7", ["select", "--config", "FOLDER/fractional.yaml", "--pool", "FOLDER/rows.jsonl",
                                        "--target", "FOLDER/rows.jsonl", "--output", "FOLDER/out9"],
     "num_landmarks must be an integer >= 1, got 4.7"),
    ("select: YAML num_landmarks null", ["select", "--config", "FOLDER/null.yaml", "--pool", "FOLDER/rows.jsonl",
                                         "--target", "FOLDER/rows.jsonl", "--output", "FOLDER/out10"],
     "num_landmarks must be an integer >= 1, got None"),
    ("select: output is a file", ["select", "--pool", "FOLDER/rows.jsonl", "--target", "FOLDER/rows.jsonl",
                                  "--output", "FOLDER/a_file"], "is a file"),
    ("select: unknown group column", ["select", "--pool", "FOLDER/rows.jsonl", "--target", "FOLDER/rows.jsonl",
                                      "--output", "FOLDER/out2", "--group_column", "domain"],
     "'domain' is not a column"),
    ("predict without a network", ["predict", "--pool", "FOLDER/rows.jsonl"], "--network is required"),
    ("predict: an option it ignores", ["predict", "--network", "x", "--method", "random"],
     "does not use --method"),
    ("predict: a missing network folder", ["predict", "--network", "FOLDER/no_network", "--pool",
                                           "FOLDER/rows.jsonl", "--target", "FOLDER/rows.jsonl", "--output",
                                           "FOLDER/out3"], "no_network"),
    ("select: --dtype and --model_init_kwargs disagree", ["select", "--pool", "FOLDER/rows.jsonl", "--target",
                                                          "FOLDER/rows.jsonl", "--output", "FOLDER/out5", "--dtype",
                                                          "bfloat16", "--model_init_kwargs", '{"dtype": "float16"}'],
     "--dtype 'bfloat16' and --model_init_kwargs {'dtype': 'float16'} disagree"),
    ("select: a malformed JSON Lines pool", ["select", "--pool", "FOLDER/malformed.jsonl", "--target",
                                             "FOLDER/rows.jsonl", "--output", "FOLDER/out6"],
     "malformed.jsonl, line 2: not valid JSON"),
    ("select: an empty target file", ["select", "--pool", "FOLDER/rows.jsonl", "--target", "FOLDER/empty.jsonl",
                                      "--output", "FOLDER/out7"], "empty.jsonl is empty: it holds no rows"),
    ("select: work_dir inside the output", ["select", "--pool", "FOLDER/rows.jsonl", "--target", "FOLDER/rows.jsonl",
                                            "--output", "FOLDER/out8", "--work_dir", "FOLDER/out8/work"],
     "--work_dir FOLDER/out8/work is inside --output FOLDER/out8"),
    ("fit-network: output holds foreign files", ["fit-network", "--pool", "FOLDER/rows.jsonl", "--target",
                                                 "FOLDER/rows.jsonl", "--output", "FOLDER/earlier_fit"],
     "holds files this command does not write (notes.txt)"),
    ("fit-network: output is a file", ["fit-network", "--pool", "FOLDER/rows.jsonl", "--target",
                                       "FOLDER/rows.jsonl", "--output", "FOLDER/a_file"], "is a file"),
    ("train: output_dir is a file", ["train", "--pool", "FOLDER/rows.jsonl", "--target", "FOLDER/rows.jsonl",
                                     "--output_dir", "FOLDER/a_file"], "--output_dir FOLDER/a_file is a file"),
    ("push without a repo", ["push", "--network", "FOLDER"], "push needs --repo_id"),
    ("push: a missing network folder", ["push", "--network", "FOLDER/no_network", "--repo_id", "me/x"],
     "--network 'FOLDER/no_network' is not a folder"),
    ("select: a missing model folder", ["select", "--pool", "FOLDER/rows.jsonl", "--target", "FOLDER/rows.jsonl",
                                        "--output", "FOLDER/out4", "--model", "FOLDER/no_model"],
     "Model folder 'FOLDER/no_model' does not exist"),
    ("unknown command", ["selcet"], "Unknown command 'selcet'"),
]


@pytest.mark.parametrize(("argv", "words"), [case[1:] for case in CLI_CASES], ids=[case[0] for case in CLI_CASES])
def test_cli_refuses_bad_input_in_one_line_with_exit_code_2(files, argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/select, ...) would land here
    argv = [arg.replace("FOLDER", str(files)) for arg in argv]
    before = {path: path.read_bytes() for path in files.rglob("*") if path.is_file()}
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert {path: path.read_bytes() for path in files.rglob("*") if path.is_file()} == before  # nothing written
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    lines = err.strip().splitlines()
    prefix = f"hf-influence {argv[0]}: error: " if argv[0] in cli.COMMANDS else "hf-influence: error: "
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1 and words.replace("FOLDER", str(files)) in errors[0], err
    assert len(lines) <= 3, err  # the error, at most a pointer to --help, at most one warning


def test_config_objects_are_accepted_beside_keywords():
    from hf_influence.extraction.gradients import GradientConfig
    from hf_influence.options import SelectionConfig

    pool, target = demo_pool(3, seed=0), demo_target("math", 2, seed=1)
    by_keywords = select_by_influence(pool, target, budget=4, method="random", selection_seed=3)
    by_config = select_by_influence(pool, target, budget=4, configs=[SelectionConfig(method="random",
                                                                                     selection_seed=3)])
    assert by_config["id"] == by_keywords["id"]
    overridden = select_by_influence(pool, target, budget=4, selection_seed=3,
                                     configs=[SelectionConfig(method="random", selection_seed=9)])
    assert overridden["id"] == by_keywords["id"]  # the keyword wins over the config's field
    with pytest.raises(TypeError, match="configs takes instances of"):
        select_by_influence(pool, target, budget=4, configs=[{"method": "random"}])
    with pytest.raises(TypeError, match="two SelectionConfig"):
        select_by_influence(pool, target, budget=4, configs=[SelectionConfig(), SelectionConfig()])
    from hf_influence.options import split_options

    configs = split_options({"projection_seed": 4}, [GradientConfig(projection_dim=64, projection_seed=1)])
    assert (configs[GradientConfig].projection_dim, configs[GradientConfig].projection_seed) == (64, 4)


def test_a_refused_or_failed_write_leaves_the_earlier_result_whole(tmp_path):
    """store.folder_replacement: the new result replaces the folder only once it is complete; an error while
    writing it leaves the earlier folder byte for byte, and no staging folder behind."""
    from hf_influence.extraction.store import folder_replacement

    folder = tmp_path / "out"
    with folder_replacement(folder) as staging:
        (staging / "selected.jsonl").write_text("old rows\n")
        (staging / "report.json").write_text("{}")
    with pytest.raises(RuntimeError, match="crashed halfway"):
        with folder_replacement(folder) as staging:
            (staging / "selected.jsonl").write_text("new rows\n")
            raise RuntimeError("crashed halfway")
    assert (folder / "selected.jsonl").read_text() == "old rows\n" and (folder / "report.json").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    with folder_replacement(folder) as staging:
        (staging / "selected.jsonl").write_text("new rows\n")
    assert sorted(path.name for path in folder.iterdir()) == ["selected.jsonl"]  # no stale report.json beside it
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_fit_network_refuses_a_foreign_output_before_any_oracle_call(files, monkeypatch):
    from hf_influence.cli import network

    def no_oracle(*args, **kwargs):
        raise AssertionError("the oracle ran before --output was checked")

    monkeypatch.setattr(network, "nn_cift", no_oracle)
    with pytest.raises(SystemExit, match="notes.txt"):
        network.run_fit_network(["--pool", str(files / "rows.jsonl"), "--target", str(files / "rows.jsonl"),
                                 "--output", str(files / "earlier_fit")])
    assert (files / "earlier_fit" / "notes.txt").read_text() == "mine"
