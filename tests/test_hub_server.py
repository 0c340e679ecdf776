"""The loopback Hub of `hub_server.py`, driven by the real huggingface_hub and datasets clients."""

import os
from pathlib import Path

import datasets
import hub_server
import huggingface_hub
import pytest
import torch
from hub_server import LocalHub, point_clients_at
from huggingface_hub import (
    CommitOperationAdd,
    DatasetCard,
    DatasetCardData,
    HfApi,
    ModelCard,
    ModelCardData,
    PyTorchModelHubMixin,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

# The fixture, bound by assignment: `from hub_server import local_hub` works too but trips ruff's F811 at each use.
local_hub = hub_server.local_hub


def _lfs_uploads(hub):
    return [path for method, path in hub.requests if method == "PUT" and path.startswith("/lfs-objects/")]


def test_upload_and_download_model_repo(local_hub, tmp_path):
    api = HfApi()
    repo_id = f"{local_hub.user}/tiny-files"
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.startswith(local_hub.endpoint)
    api.create_repo(repo_id, exist_ok=True)  # 409, handled by the client
    with pytest.raises(huggingface_hub.errors.HfHubHTTPError):
        api.create_repo(repo_id)

    # A small text file goes inline in the commit.
    api.upload_file(path_or_fileobj=b"hello hub\n", path_in_repo="hello.txt", repo_id=repo_id)
    assert _lfs_uploads(local_hub) == []

    # A binary file and a large text file go through the LFS batch API and a PUT each.
    folder = tmp_path / "folder"
    (folder / "notes").mkdir(parents=True)
    weights = os.urandom(3 * 1024 * 1024)
    big_text = ("lorem ipsum " * 130_000).encode()  # 1.5 MB, over the LFS threshold
    (folder / "weights.bin").write_bytes(weights)
    (folder / "notes" / "big.txt").write_bytes(big_text)
    (folder / "config.json").write_text('{"hidden_size": 4}')
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Add folder")
    assert len(_lfs_uploads(local_hub)) == 2
    assert commit.oid == api.repo_info(repo_id).sha

    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes", "config.json", "hello.txt", "notes/big.txt", "weights.bin",
    ]
    info = api.model_info(repo_id, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["weights.bin"].lfs.size == len(weights) and siblings["hello.txt"].lfs is None
    assert info.config == {"hidden_size": 4}
    top = {entry.path: entry for entry in api.list_repo_tree(repo_id)}
    assert set(top) == {".gitattributes", "config.json", "hello.txt", "notes", "weights.bin"}
    assert isinstance(top["notes"], huggingface_hub.hf_api.RepoFolder)
    [big_info] = api.get_paths_info(repo_id, ["notes/big.txt", "missing.txt"])
    assert big_info.lfs.size == len(big_text)
    assert api.file_exists(repo_id, "notes/big.txt") and not api.file_exists(repo_id, "nope.txt")

    # Downloads into a fresh cache give the same bytes back.
    cache = tmp_path / "fresh-cache"
    for filename, content in [("hello.txt", b"hello hub\n"), ("weights.bin", weights), ("notes/big.txt", big_text)]:
        assert Path(hf_hub_download(repo_id, filename, cache_dir=cache)).read_bytes() == content
    snapshot = snapshot_download(repo_id, cache_dir=tmp_path / "snapshot-cache")
    assert (Path(snapshot) / "weights.bin").read_bytes() == weights

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "hello.txt", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{local_hub.user}/does-not-exist")
    assert api.whoami()["name"] == local_hub.user

    private_id = api.create_repo(f"{local_hub.user}/secret", private=True).repo_id
    assert api.model_info(private_id).private
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(private_id, token=False)
    assert not local_hub.unhandled


def test_second_commit_updates_file_and_old_revision_still_resolves(local_hub, tmp_path):
    api = HfApi()
    repo_id = f"{local_hub.user}/versions"
    api.create_repo(repo_id)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="data/value.txt", repo_id=repo_id)
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="data/value.txt", repo_id=repo_id)
    assert first.oid != second.oid
    # Same content again: the client sees the remote oid and skips the empty commit.
    again = api.upload_file(path_or_fileobj=b"v2", path_in_repo="data/value.txt", repo_id=repo_id)
    assert again.oid == second.oid

    def read(revision):
        return Path(hf_hub_download(repo_id, "data/value.txt", revision=revision, cache_dir=tmp_path / "c")).read_bytes()

    assert read(None) == b"v2"
    assert read(first.oid) == b"v1"
    assert read(first.oid[:10]) == b"v1"
    assert [c.commit_id for c in api.list_repo_commits(repo_id)][:2] == [second.oid, first.oid]

    api.create_branch(repo_id, branch="old", revision=first.oid)
    assert read("old") == b"v1"
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second.oid, "old": first.oid}

    pr = api.upload_file(path_or_fileobj=b"v3", path_in_repo="data/value.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and read("refs/pr/1") == b"v3" and read("main") == b"v2"

    api.delete_file("data/value.txt", repo_id=repo_id)
    assert not api.file_exists(repo_id, "data/value.txt")
    assert not local_hub.unhandled


def test_tree_listing_paginates(local_hub):
    api = HfApi()
    repo_id = f"{local_hub.user}/many-files"
    api.create_repo(repo_id)
    api.create_commit(
        repo_id,
        [CommitOperationAdd(f"dir{i % 2}/file{i}.txt", f"{i}".encode()) for i in range(7)],
        commit_message="many files",
    )
    local_hub.tree_page_size = 3
    before = len(local_hub.requests)
    entries = list(api.list_repo_tree(repo_id, recursive=True))
    assert sum("/tree/" in path for _, path in local_hub.requests[before:]) == 4  # 10 entries (2 folders, 8 files) in pages of 3
    assert sorted(e.path for e in entries) == sorted(
        [".gitattributes", "dir0", "dir1"] + [f"dir{i % 2}/file{i}.txt" for i in range(7)]
    )
    assert sorted(e.path for e in api.list_repo_tree(repo_id, path_in_repo="dir1")) == [
        "dir1/file1.txt", "dir1/file3.txt", "dir1/file5.txt",
    ]
    assert not local_hub.unhandled


class TinyNet(torch.nn.Module, PyTorchModelHubMixin):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.linear = torch.nn.Linear(3, hidden)


def test_pytorch_model_hub_mixin_roundtrip(local_hub):
    torch.manual_seed(0)
    model = TinyNet(hidden=5)
    repo_id = f"{local_hub.user}/tiny-net"
    model.push_to_hub(repo_id)
    assert "model.safetensors" in HfApi().list_repo_files(repo_id)
    assert _lfs_uploads(local_hub)  # *.safetensors go through LFS

    loaded = TinyNet.from_pretrained(repo_id)
    assert loaded.linear.out_features == 5  # from config.json
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert not local_hub.unhandled


def test_model_and_dataset_cards_roundtrip(local_hub):
    api = HfApi()
    model_id, dataset_id = f"{local_hub.user}/card-model", f"{local_hub.user}/card-dataset"
    api.create_repo(model_id)
    api.create_repo(dataset_id, repo_type="dataset")

    model_card = ModelCard.from_template(
        ModelCardData(license="apache-2.0", tags=["influence", "test"], library_name="pytorch"),
        model_description="A tiny model.",
    )
    model_card.push_to_hub(model_id)
    loaded = ModelCard.load(model_id)
    assert loaded.content == model_card.content
    assert loaded.data.license == "apache-2.0" and loaded.data.tags == ["influence", "test"]
    info = api.model_info(model_id)
    assert info.card_data.license == "apache-2.0" and info.library_name == "pytorch"

    dataset_card = DatasetCard.from_template(
        DatasetCardData(language="en", license="mit", pretty_name="Tiny rows"), pretty_name="Tiny rows"
    )
    dataset_card.push_to_hub(dataset_id)
    loaded = DatasetCard.load(dataset_id)
    assert loaded.content == dataset_card.content
    assert loaded.data.license == "mit" and loaded.data.pretty_name == "Tiny rows"
    assert api.dataset_info(dataset_id).card_data.language == "en"
    assert not local_hub.unhandled


@pytest.mark.slow
def test_dataset_push_to_hub_two_configs_and_load_dataset(local_hub):
    repo_id = f"{local_hub.user}/tiny-rows"
    chat = datasets.Dataset.from_dict({"prompt": ["What is 2+2?", "Say hi."], "answer": ["4", "hi"]})
    scores = datasets.Dataset.from_dict({"id": [0, 1, 2], "score": [0.5, -1.0, 2.25]})
    chat.push_to_hub(repo_id, config_name="chat")
    scores.push_to_hub(repo_id, config_name="scores", split="test")

    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert any(f.startswith("chat/train-") and f.endswith(".parquet") for f in files)
    assert any(f.startswith("scores/test-") and f.endswith(".parquet") for f in files)

    loaded_chat = datasets.load_dataset(repo_id, name="chat", split="train")
    loaded_scores = datasets.load_dataset(repo_id, name="scores")
    assert loaded_chat.to_list() == chat.to_list()
    assert list(loaded_scores) == ["test"] and loaded_scores["test"].to_list() == scores.to_list()
    card = DatasetCard.load(repo_id)
    assert {c["config_name"] for c in card.data.configs} == {"chat", "scores"}
    assert not local_hub.unhandled


def test_transformers_push_to_hub_and_from_pretrained(local_hub):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_influence.testing import tiny_causal_lm

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    repo_id = f"{local_hub.user}/tiny-llama"
    model.push_to_hub(repo_id)
    tokenizer.push_to_hub(repo_id)
    loaded = AutoModelForCausalLM.from_pretrained(repo_id)
    loaded_tokenizer = AutoTokenizer.from_pretrained(repo_id)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])
    assert loaded_tokenizer("The answer is 19.")["input_ids"] == tokenizer("The answer is 19.")["input_ids"]
    assert not local_hub.unhandled


def test_unknown_endpoint_answers_501_and_is_recorded(local_hub):
    from huggingface_hub.utils import get_session

    response = get_session().get(f"{local_hub.endpoint}/api/spaces-hardware")
    assert response.status_code == 501 and "/api/spaces-hardware" in response.json()["error"]
    assert local_hub.unhandled == ["GET /api/spaces-hardware: no such endpoint on LocalHub"]
    local_hub.unhandled.clear()


def test_point_clients_at_is_undone(tmp_path):
    import datasets.config
    from huggingface_hub import constants

    def state():
        return (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_OFFLINE,
                constants.HF_HUB_CACHE, datasets.config.HF_ENDPOINT, datasets.config.HF_HUB_OFFLINE,
                datasets.config.HF_DATASETS_CACHE, huggingface_hub.hf_api.api.endpoint, os.environ.get("HF_ENDPOINT"),
                os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_TOKEN"))

    saved = state()
    with LocalHub() as hub, pytest.MonkeyPatch.context() as monkeypatch:
        point_clients_at(hub, tmp_path, monkeypatch)
        assert constants.ENDPOINT == hub.endpoint == datasets.config.HF_ENDPOINT == os.environ["HF_ENDPOINT"]
        assert not constants.is_offline_mode() and constants.HF_HUB_CACHE.startswith(str(tmp_path))
        assert HfApi().whoami()["name"] == hub.user
    assert state() == saved


def test_suite_settings_hold_outside_the_fixture():
    """After the tests above, the clients are back on the suite's (offline) settings."""
    import datasets.config
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    assert constants.HF_HUB_OFFLINE == offline and datasets.config.HF_HUB_OFFLINE == offline
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    assert constants.ENDPOINT == datasets.config.HF_ENDPOINT.rstrip("/") == endpoint
    assert huggingface_hub.hf_api.api.endpoint == endpoint
    assert "127.0.0.1" not in constants.HUGGINGFACE_CO_URL_TEMPLATE
