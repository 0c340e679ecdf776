"""A loopback, in-memory Hugging Face Hub for tests: the real `huggingface_hub` / `datasets` clients push and pull.

`LocalHub` serves the subset of the Hub HTTP API that the clients call (repo creation and info, preupload, NDJSON
commits, the Git LFS batch API with its upload/verify endpoints, tree listings, paths-info, refs, commits and
`/resolve` downloads) from a `ThreadingHTTPServer` on 127.0.0.1 and a random free port. Its formats follow the
installed `huggingface_hub` sources (`hf_api.py`, `_commit_api.py`, `lfs.py`, `file_download.py`).

The `local_hub` fixture starts one per test and points every client at it (environment variables and the
module-level constants read at import time), with fresh caches, then restores everything::

    import hub_server

    local_hub = hub_server.local_hub  # or `from hub_server import local_hub  # noqa: F401` (then F811 at each use)

    def test_roundtrip(local_hub):
        repo_id = f"{local_hub.user}/my-model"
        HfApi().create_repo(repo_id)
        ...

A request that the server does not implement is answered 501 with its method and path, logged as a warning and
recorded in `LocalHub.unhandled`, so that a missing endpoint shows up at once instead of as a retry loop.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import traceback
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest
import yaml

logger = logging.getLogger("hub_server")

# Files that go through Git LFS, as in the `.gitattributes` the Hub writes into every new repo (abridged).
DEFAULT_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.model", "*.msgpack",
    "*.npy", "*.npz", "*.onnx", "*.parquet", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar",
    "*.tgz", "*.xz", "*.zip", "*.zst",
)
DEFAULT_LFS_SIZE_THRESHOLD = 1_000_000  # bytes; the Hub uses 10 MB, smaller here so that tests stay fast
REPO_TYPE_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
PLURAL_TO_REPO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _matches(path: str, pattern: str) -> bool:
    """Git-attributes style: a pattern without '/' matches the basename, otherwise the whole path."""
    pattern = pattern.strip()
    if not pattern or pattern.startswith("#"):
        return False
    if "/" in pattern.strip("/"):
        return fnmatch.fnmatch(path, pattern.strip("/"))
    return fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern.strip("/")) or fnmatch.fnmatch(path, pattern)


def _card_data(content: bytes) -> dict | None:
    """YAML front matter of a README.md, as the Hub returns it in `cardData`."""
    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(\r?\n|$)", content.decode("utf-8", errors="replace"), re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class RepoEntry:
    """One file of a commit's tree. Its content lives in `LocalHub.objects` under `sha256`."""

    path: str
    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git OID: the sha1 of the blob, which for an LFS file is its pointer file
    last_commit: str = ""  # sha of the commit that last changed this file

    @classmethod
    def of(cls, path: str, content: bytes, lfs: bool) -> RepoEntry:
        sha256 = hashlib.sha256(content).hexdigest()
        blob = _lfs_pointer(sha256, len(content)) if lfs else content
        return cls(path=path, sha256=sha256, size=len(content), lfs=lfs, blob_id=_git_blob_sha1(blob))

    @property
    def etag(self) -> str:
        # What `hf_hub_download` names the cached blob after: the sha256 for LFS files, the git sha1 otherwise.
        return self.sha256 if self.lfs else self.blob_id

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass
class Commit:
    sha: str
    parents: list[str]
    title: str
    message: str
    date: str
    author: str
    tree: dict[str, RepoEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch, tag, `refs/...` name, full sha or unambiguous sha prefix (7+ characters)."""
        revision = unquote(revision)
        if revision.startswith("refs/heads/"):
            return self.branches.get(revision[len("refs/heads/"):])
        if revision.startswith("refs/tags/"):
            return self.tags.get(revision[len("refs/tags/"):])
        if match := re.fullmatch(r"refs/pr/(\d+)", revision):
            return self.pull_requests.get(int(match.group(1)))
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [sha for sha in self.commits if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    @property
    def url_prefix(self) -> str:
        return REPO_TYPE_PREFIXES[self.repo_type]


class HubError(Exception):
    """Turned by the handler into an error response with the `X-Error-Code` the client maps to an exception."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


class LocalHub:
    """An in-memory Hub on a loopback port. `start()` / `stop()`, or use it as a context manager.

    Args:
        user: the namespace that `whoami` reports and that repos created without one land in.
        token: the token that writes must carry (`Authorization: Bearer <token>`); reads of public repos need none.
        lfs_patterns: a file whose path matches one of these goes to LFS in `preupload`...
        lfs_size_threshold: ...as does a file larger than this, or one whose first 512 bytes hold a NUL byte.
        tree_page_size: entries per page of `/tree` listings (the Hub uses 1000), to exercise pagination.
    """

    def __init__(
        self,
        user: str = "local-user",
        token: str = "hf_local_hub_test_token",
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        lfs_size_threshold: int = DEFAULT_LFS_SIZE_THRESHOLD,
        tree_page_size: int = 1000,
    ):
        self.user = user
        self.token = token
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_size_threshold = lfs_size_threshold
        self.tree_page_size = tree_page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.objects: dict[str, bytes] = {}  # content of every file (regular and LFS), by sha256
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[str] = []  # "METHOD path: reason" of every request answered 501
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        hub = self

        class Handler(_HubRequestHandler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        logger.info("LocalHub serving on %s", self.endpoint)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------- helpers

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (for assertions in tests)."""
        return self.repos[(repo_type, repo_id)]

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{repo.url_prefix}{repo.repo_id}"

    def _store(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        self.objects.setdefault(sha256, content)
        return sha256

    def _entry(self, path: str, content: bytes, lfs: bool) -> RepoEntry:
        self._store(content)
        return RepoEntry.of(path, content, lfs)

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, RepoEntry], title: str, message: str,
                    author: str) -> Commit:
        seed = json.dumps([repo.repo_type, repo.repo_id, parent, sorted((p, e.sha256) for p, e in tree.items()),
                           title, message, next(self._counter)])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        # Entries added or changed by this commit carry it as their last commit.
        parent_tree = repo.commits[parent].tree if parent else {}
        new_tree = {}
        for path, entry in tree.items():
            old = parent_tree.get(path)
            unchanged = old is not None and old.sha256 == entry.sha256 and old.lfs == entry.lfs
            new_tree[path] = old if unchanged else replace(entry, last_commit=sha)
        commit = Commit(sha=sha, parents=[parent] if parent else [], title=title, message=message, date=_now(),
                        author=author, tree=new_tree)
        repo.commits[sha] = commit
        return commit

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with the Hub's initial commit (a `.gitattributes` listing the LFS patterns)."""
        with self.lock:
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            gitattributes = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns).encode()
            commit = self._new_commit(
                repo, None, {".gitattributes": self._entry(".gitattributes", gitattributes, False)},
                "initial commit", "", "system",
            )
            repo.branches["main"] = commit.sha
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def is_lfs(self, path: str, size: int, sample: bytes = b"") -> bool:
        return size > self.lfs_size_threshold or b"\x00" in sample or any(_matches(path, p) for p in self.lfs_patterns)


# --------------------------------------------------------------------------------------------------- handler


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients pool connections
    timeout = 60  # drop idle keep-alive connections eventually
    hub: LocalHub

    # --- plumbing ------------------------------------------------------------------------------------------

    def log_message(self, format, *args):
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None):
        """Record the response; `_dispatch` writes it once the hub's lock is released."""
        self._response = (status, body, dict(headers or {}), content_type)

    def _json(self, obj, status: int = 200, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(obj).encode(), headers, content_type=content_type)

    def _write_response(self):
        status, body, headers, content_type = self._response
        self.send_response(status)
        if content_type:
            headers["Content-Type"] = content_type
        headers["Content-Length"] = len(body)
        for key, value in headers.items():
            # Header values must be one latin-1 line (error messages may hold newlines or any character).
            value = " ".join(str(value).splitlines()).encode("latin-1", "backslashreplace").decode("latin-1")
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _dispatch(self, method: str):
        body = self._read_body()  # always consume the body, so that the keep-alive connection stays in sync
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.body = body
        self._response = None
        hub = self.hub
        logger.debug("%s %s", method, self.path)
        try:
            with hub.lock:  # one request at a time touches the state
                hub.requests.append((method, split.path))
                if not self._route(method, split.path):
                    raise _Unhandled("no such endpoint on LocalHub")
        except HubError as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.error_code:
                headers["X-Error-Code"] = e.error_code
            self._json({"error": e.message}, status=e.status, headers=headers)
        except _Unhandled as e:
            self._unhandled(method, str(e))
        except Exception:  # noqa: BLE001 - a bug in this server: answer 501 (never retried by clients), with the traceback
            self._unhandled(method, "server error\n" + traceback.format_exc())
        try:
            self._write_response()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _unhandled(self, method: str, reason: str):
        line = f"{method} {self.path}: {reason}"
        with self.hub.lock:
            self.hub.unhandled.append(line)
        logger.warning("LocalHub cannot answer %s", line)
        message = f"LocalHub does not implement {method} {self.path} ({reason.splitlines()[0]})"
        self._json({"error": message}, status=501, headers={"X-Error-Message": message})

    def _param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def _flag(self, name: str) -> bool:
        return (self._param(name) or "").lower() in ("1", "true", "yes")

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    # --- auth ----------------------------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _require_write(self):
        if self._token() != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _get_repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._require_write()
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self._token() != self.hub.token):
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return repo.commits[sha]

    # --- routing -------------------------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> bool:
        segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
        if segments[:1] == ["api"]:
            return self._route_api(method, segments[1:])
        if segments[:1] == ["lfs-objects"] and len(segments) == 2:
            return self._lfs_object(method, segments[1])
        if segments[:1] == ["lfs-verify"] and len(segments) == 2 and method == "POST":
            return self._lfs_verify(segments[1])
        repo_type = "model"
        if segments and segments[0] in PLURAL_TO_REPO_TYPE:
            repo_type, segments = PLURAL_TO_REPO_TYPE[segments[0]], segments[1:]
        raw = "/".join(segments)
        if raw.endswith(".git/info/lfs/objects/batch") and method == "POST":
            return self._lfs_batch(repo_type, raw[: -len(".git/info/lfs/objects/batch")])
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(repo_type, "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
        return False

    def _route_api(self, method: str, segments: list[str]) -> bool:
        hub = self.hub
        if segments == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if segments == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if segments == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if segments == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if segments == ["agent-harnesses"] and method == "GET":
            self._json({"standardEnvVars": [], "harnesses": {}})  # read by `huggingface_hub.utils._detect_agent`
            return True
        if len(segments) < 3 or segments[0] not in PLURAL_TO_REPO_TYPE:
            return False
        repo_type = PLURAL_TO_REPO_TYPE[segments[0]]
        repo_id, rest = "/".join(segments[1:3]), segments[3:]
        if (repo_type, repo_id) not in hub.repos and (repo_type, segments[1]) in hub.repos:
            repo_id, rest = segments[1], segments[2:]  # canonical repo without a namespace
        action, args = (rest[0], rest[1:]) if rest else (None, [])
        if action is None and method == "GET":
            return self._repo_info(repo_type, repo_id, "main")
        if action == "revision" and args and method == "GET":
            return self._repo_info(repo_type, repo_id, "/".join(args))
        if action == "preupload" and args and method == "POST":
            return self._preupload(repo_type, repo_id, "/".join(args))
        if action == "commit" and args and method == "POST":
            return self._commit(repo_type, repo_id, "/".join(args))
        if action == "tree" and args and method == "GET":
            return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
        if action == "paths-info" and args and method == "POST":
            return self._paths_info(repo_type, repo_id, "/".join(args))
        if action == "refs" and not args and method == "GET":
            return self._refs(repo_type, repo_id)
        if action == "commits" and method == "GET":
            return self._commits(repo_type, repo_id, "/".join(args) or "main")
        if action == "branch" and args:
            return self._branch(method, repo_type, repo_id, "/".join(args))
        if action == "tag" and args:
            return self._tag(method, repo_type, repo_id, "/".join(args))
        return False

    # --- account / repos -----------------------------------------------------------------------------------

    def _whoami(self) -> bool:
        if self._token() != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json({
            "type": "user", "id": "0" * 24, "name": self.hub.user, "fullname": "Local Hub User", "email": None,
            "emailVerified": True, "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "local-hub", "role": "write", "createdAt": _now()}},
        })
        return True

    def _create_repo(self) -> bool:
        self._require_write()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPE_PREFIXES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        existing = self.hub.repos.get((repo_type, repo_id))
        if existing is not None:
            # `create_repo(exist_ok=True)` still reads `url` from this body.
            self._json({"error": f"You already created this {repo_type} repo", "url": self.hub._repo_url(existing)},
                       status=409, headers={"X-Error-Message": f"You already created this {repo_type} repo"})
            return True
        private = payload.get("private") or payload.get("visibility") == "private"
        repo = self.hub.create_repo(repo_id, repo_type, private=bool(private))
        self._json({"url": self.hub._repo_url(repo), "name": repo_id, "id": repo_id})
        return True

    def _delete_repo(self) -> bool:
        self._require_write()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        if self.hub.repos.pop((repo_type, repo_id), None) is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        self._send(200)
        return True

    def _validate_yaml(self) -> bool:
        content = self._json_body().get("content", "")
        match = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(\r?\n|$)", content, re.DOTALL)
        if match:
            try:
                data = yaml.safe_load(match.group(1))
            except yaml.YAMLError as e:
                raise HubError(400, f"Invalid YAML in README.md metadata: {e}") from e
            if data is not None and not isinstance(data, dict):
                raise HubError(400, "README.md metadata must be a YAML mapping")
        self._json({"errors": [], "warnings": []})
        return True

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> bool:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._resolve(repo, revision)
        blobs = self._flag("blobs")
        siblings = []
        for entry in sorted(commit.tree.values(), key=lambda e: e.path):
            sibling: dict = {"rfilename": entry.path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        readme = commit.tree.get("README.md")
        card_data = _card_data(self.hub.objects[readme.sha256]) if readme is not None else None
        info: dict = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card_data or {}).get("tags") or []),
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }
        if card_data is not None:
            info["cardData"] = card_data
        if repo_type == "model":
            info["modelId"] = repo_id
            info["spaces"] = []
            if card_data and card_data.get("library_name"):
                info["library_name"] = card_data["library_name"]
            config = commit.tree.get("config.json")
            if config is not None and config.size < 1_000_000:
                try:
                    info["config"] = json.loads(self.hub.objects[config.sha256])
                except ValueError:
                    pass
        expand = self.query.get("expand") or self.query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        self._json(info)
        return True

    # --- uploads -------------------------------------------------------------------------------------------

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> bool:
        repo = self._get_repo(repo_type, repo_id, write=True)
        commit = self._resolve(repo, revision) if not self._flag("create_pr") else self._resolve(repo, "main")
        payload = self._json_body()
        ignore_patterns = [line for line in (payload.get("gitIgnore") or "").splitlines() if line.strip()]
        files = []
        for file in payload.get("files", []):
            path, size = file["path"], int(file.get("size", 0))
            sample = base64.b64decode(file.get("sample") or "")
            lfs = self.hub.is_lfs(path, size, sample)
            existing = commit.tree.get(path)
            # The client compares this with the sha256 (LFS) or git sha1 (regular) of its file to skip no-op changes.
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.blob_id)
            files.append({
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": any(_matches(path, p) for p in ignore_patterns),
                "oid": oid,
            })
        self._json({"files": files, "commitOid": commit.sha})
        return True

    def _lfs_batch(self, repo_type: str, repo_id: str) -> bool:
        self._get_repo(repo_type, repo_id, write=True)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise _Unhandled(f"LFS batch operation {payload.get('operation')!r}")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            out: dict = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.objects:  # no `actions`: the object is already stored, nothing to upload
                out["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-objects/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(out)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")
        return True

    def _lfs_object(self, method: str, oid: str) -> bool:
        if method == "PUT":  # the "S3" upload: like a presigned URL, it needs no token
            if hashlib.sha256(self.body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match sha256 {oid}")
            self.hub.objects.setdefault(oid, self.body)
            self._send(200, headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})
            return True
        if method in ("GET", "HEAD"):
            content = self.hub.objects.get(oid)
            if content is None:
                raise HubError(404, f"No LFS object {oid}")
            self._send(200, content, content_type="application/octet-stream")
            return True
        return False

    def _lfs_verify(self, oid: str) -> bool:
        self._require_write()
        payload = self._json_body()
        content = self.hub.objects.get(oid)
        if content is None or len(content) != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {oid} was not uploaded (or has the wrong size)")
        self._json({"success": True})
        return True

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> bool:
        hub = self.hub
        repo = self._get_repo(repo_type, repo_id, write=True)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if "ndjson" not in (self.headers.get("Content-Type") or "") or not lines or lines[0].get("key") != "header":
            raise _Unhandled("commit payloads other than NDJSON starting with a header line")
        header = lines[0]["value"]
        head = self._resolve(repo, revision)
        create_pr = self._flag("create_pr")
        parent_commit = header.get("parentCommit")
        if parent_commit and not head.sha.startswith(parent_commit) and not create_pr:
            raise HubError(412, f"A commit has happened since {parent_commit}: the head is now {head.sha}")
        if parent_commit and create_pr:
            head = self._resolve(repo, parent_commit)
        tree = dict(head.tree)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding", "base64") == "base64":
                    content = base64.b64decode(value.get("content", ""))
                else:
                    content = value.get("content", "").encode()
                tree[path] = hub._entry(path, content, False)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in hub.objects:
                    raise HubError(400, f"LFS object {oid} for {path} was never uploaded")
                tree[path] = hub._entry(path, hub.objects[oid], True)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                removed = [p for p in tree if p.startswith(prefix)]
                if not removed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in removed:
                    del tree[p]
            else:
                raise _Unhandled(f"commit operation {key!r}")
        title = header.get("summary") or "Commit"
        description = header.get("description") or ""
        commit = hub._new_commit(repo, head.sha, tree, title, f"{title}\n\n{description}".strip(), hub.user)
        response = {"success": True, "commitOid": commit.sha, "commitUrl": f"{hub._repo_url(repo)}/commit/{commit.sha}",
                    "hookOutput": ""}
        if create_pr:
            number = max(repo.pull_requests, default=0) + 1
            repo.pull_requests[number] = commit.sha
            response["pullRequestUrl"] = f"{hub._repo_url(repo)}/discussions/{number}"
        else:
            ref = unquote(revision).removeprefix("refs/heads/")
            if match := re.fullmatch(r"refs/pr/(\d+)", ref):
                repo.pull_requests[int(match.group(1))] = commit.sha
            elif ref in repo.branches:
                repo.branches[ref] = commit.sha
            else:
                raise HubError(400, f"Can only commit to a branch or a pull request, not {ref!r}")
        self._json(response)
        return True

    # --- listings ------------------------------------------------------------------------------------------

    def _tree_entries(self, commit: Commit, repo: Repo, expand: bool) -> dict[str, dict]:
        """Every file and (implicit) folder of a commit, as `/tree` and `/paths-info` return them."""
        out: dict[str, dict] = {}
        folder_children: dict[str, list[RepoEntry]] = {}
        for entry in commit.tree.values():
            parts = entry.path.split("/")
            for depth in range(1, len(parts)):
                folder_children.setdefault("/".join(parts[:depth]), []).append(entry)
            item = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": entry.path}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            if expand:
                item["lastCommit"] = self._last_commit(repo, entry.last_commit)
            out[entry.path] = item
        for folder, entries in folder_children.items():
            oid = hashlib.sha1("\n".join(sorted(f"{e.path} {e.blob_id}" for e in entries)).encode()).hexdigest()
            item = {"type": "directory", "oid": oid, "size": 0, "path": folder}
            if expand:
                latest = max((repo.commits[e.last_commit] for e in entries), key=lambda c: c.date)
                item["lastCommit"] = self._last_commit(repo, latest.sha)
            out[folder] = item
        return out

    @staticmethod
    def _last_commit(repo: Repo, sha: str) -> dict:
        commit = repo.commits[sha]
        return {"id": commit.sha, "title": commit.title, "date": commit.date}

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._resolve(repo, revision)
        path = path.strip("/")
        entries = self._tree_entries(commit, repo, self._flag("expand"))
        if path and entries.get(path, {}).get("type") != "directory":
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.sha})
        prefix = path + "/" if path else ""
        recursive = self._flag("recursive")
        listing = [
            item for p, item in entries.items()
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])
        ]
        listing.sort(key=lambda item: (item["type"] != "directory", item["path"]))
        cursor = int(self._param("cursor", "0"))
        page = listing[cursor: cursor + self.hub.tree_page_size]
        headers = {}
        if cursor + self.hub.tree_page_size < len(listing):
            query = {k: v[0] for k, v in self.query.items()}
            query["cursor"] = str(cursor + self.hub.tree_page_size)
            url = f"{self.hub.endpoint}{urlsplit(self.path).path}?{urlencode(query)}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(page, headers=headers)
        return True

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> bool:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._resolve(repo, revision)
        if "json" in (self.headers.get("Content-Type") or ""):
            payload = self._json_body()
            paths, expand = payload.get("paths", []), bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand", ["false"])[0]).lower() in ("1", "true")
        entries = self._tree_entries(commit, repo, expand)
        self._json([entries[p.strip("/")] for p in paths if p.strip("/") in entries])
        return True

    def _refs(self, repo_type: str, repo_id: str) -> bool:
        repo = self._get_repo(repo_type, repo_id)

        def refs(names: dict, kind: str) -> list[dict]:
            return [{"name": str(n), "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in names.items()]

        out = {"branches": refs(repo.branches, "heads"), "converts": [], "tags": refs(repo.tags, "tags")}
        if self._flag("include_prs"):
            out["pullRequests"] = refs(repo.pull_requests, "pr")
        self._json(out)
        return True

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> bool:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._resolve(repo, revision)
        history = []
        while commit is not None:
            history.append({
                "id": commit.sha, "title": commit.title, "message": commit.message, "date": commit.date,
                "authors": [{"user": commit.author}], "parents": commit.parents,
            })
            commit = repo.commits[commit.parents[0]] if commit.parents else None
        self._json(history)
        return True

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> bool:
        repo = self._get_repo(repo_type, repo_id, write=True)
        if method == "POST":
            if branch in repo.branches:
                raise HubError(409, f"Reference {branch} already exists")
            start = self._json_body().get("startingPoint") or "main"
            repo.branches[branch] = self._resolve(repo, start).sha
        elif method == "DELETE":
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        else:
            return False
        self._send(200)
        return True

    def _tag(self, method: str, repo_type: str, repo_id: str, name: str) -> bool:
        repo = self._get_repo(repo_type, repo_id, write=True)
        if method == "POST":  # /tag/{revision} with {"tag": name}
            tag = self._json_body().get("tag")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._resolve(repo, name).sha
        elif method == "DELETE":
            if repo.tags.pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        else:
            return False
        self._send(200)
        return True

    # --- downloads -----------------------------------------------------------------------------------------

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        repo = self._get_repo(repo_type, repo_id)
        commit = self._resolve(repo, revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        content = self.hub.objects[entry.sha256]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename*=UTF-8\'\'{quote(path.rsplit("/", 1)[-1])}',
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        status, body = 200, content
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
            if match is None:
                raise _Unhandled(f"Range header {range_header!r}")
            first, last = match.groups()
            if first == "":  # suffix range: the last N bytes
                start, end = max(len(content) - int(last), 0), len(content) - 1
            else:
                start, end = int(first), min(int(last), len(content) - 1) if last else len(content) - 1
            if start >= len(content) or start > end:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(content)}"})
            status, body = 206, content[start: end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, body, headers, content_type="application/octet-stream")
        return True


class _Unhandled(Exception):
    """A request, or a variant of one, that LocalHub does not implement: answered 501."""


# --------------------------------------------------------------------------------------------------- fixture


def point_clients_at(hub: LocalHub, home, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub, datasets (and transformers, if imported) at `hub`, with fresh caches under `home`.

    Everything goes through `monkeypatch`, so that it is undone when the test ends.
    """
    # Import the libraries first, with the suite's settings, so that constants they compute at import time are not
    # computed from the values below (which would outlive the test).
    import datasets.config
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api
    import huggingface_hub.utils._cache_assets
    import huggingface_hub.utils._cache_manager
    import huggingface_hub.utils._detect_agent
    import huggingface_hub.utils._git_credential
    import huggingface_hub.utils._http as hf_http

    home = str(home)
    hf_home = os.path.join(home, "huggingface")
    hub_cache = os.path.join(hf_home, "hub")
    assets_cache = os.path.join(hf_home, "assets")
    xet_cache = os.path.join(hf_home, "xet")
    token_path = os.path.join(hf_home, "token")
    datasets_cache = os.path.join(hf_home, "datasets")
    modules_cache = os.path.join(hf_home, "modules")

    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": hub.token,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HF_XET_CACHE": xet_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_MODULES_CACHE": modules_cache,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HUGGINGFACE_CO_STAGING",
                "HF_DATASETS_DOWNLOADED_DATASETS_PATH", "HF_DATASETS_EXTRACTED_DATASETS_PATH"):
        monkeypatch.delenv(key, raising=False)

    # huggingface_hub: constants read at import time.
    for name, value in {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(hf_constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets_cache,
        "HF_XET_CACHE": xet_cache,
        "HF_TOKEN_PATH": token_path,
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": os.path.join(hf_home, ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": os.path.join(hf_home, ".agent_harnesses.json"),
    }.items():
        if hasattr(hf_constants, name):
            monkeypatch.setattr(hf_constants, name, value)
    # ...and the copies that modules took with `from ..constants import X`, or built from them.
    monkeypatch.setattr(huggingface_hub.utils._cache_manager, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(huggingface_hub.utils._cache_assets, "HF_ASSETS_CACHE", assets_cache)
    monkeypatch.setattr(huggingface_hub.utils._git_credential, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(hf_http, "_HUB_ORIGINS", frozenset(hf_http._HUB_ORIGINS | {hf_http._url_origin(hub.endpoint)}))
    # The module-level `HfApi()` behind `huggingface_hub.upload_file`, `model_info`, `RepoCard.push_to_hub`, etc.
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.endpoint)
    # Agent detection caches the registry it fetched (from ENDPOINT) in-process: restore it afterwards.
    monkeypatch.setattr(huggingface_hub.utils._detect_agent, "_registry", huggingface_hub.utils._detect_agent._registry)

    # datasets: `datasets.config` is computed at import time.
    for name, value in {
        "HF_ENDPOINT": hub.endpoint,
        "HUB_DATASETS_URL": hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,  # would HEAD an S3 bucket on the internet
        "USE_PARQUET_EXPORT": False,  # would query datasets-server.<endpoint host>, which does not exist
        "HF_CACHE_HOME": hf_home,
        "HF_DATASETS_CACHE": datasets.config.Path(datasets_cache),
        "HF_MODULES_CACHE": datasets.config.Path(modules_cache),
        "DOWNLOADED_DATASETS_PATH": datasets.config.Path(datasets_cache, "downloads"),
        "EXTRACTED_DATASETS_PATH": datasets.config.Path(datasets_cache, "downloads", "extracted"),
    }.items():
        monkeypatch.setattr(datasets.config, name, value)

    # transformers keeps its own copy of the modules cache; its offline checks read huggingface_hub's constant.
    import sys

    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "HF_MODULES_CACHE"):
        monkeypatch.setattr(transformers_hub, "HF_MODULES_CACHE", modules_cache)
    # transformers' shared HfApi keeps the endpoint of whenever it was first made (e.g. by an earlier offline load).
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)


def _drop_client_state() -> None:
    """Close pooled connections and cached filesystems, which would otherwise outlive the server."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils._http import close_session

    close_session()
    HfFileSystem.clear_instance_cache()


@pytest.fixture
def local_hub(tmp_path_factory, monkeypatch):
    """A started `LocalHub`, with the Hub clients pointed at it and fresh caches for the duration of the test."""
    hub = LocalHub().start()
    try:
        point_clients_at(hub, tmp_path_factory.mktemp("local_hub_home"), monkeypatch)
        _drop_client_state()
        yield hub
    finally:
        _drop_client_state()
        hub.stop()
        if hub.unhandled:
            logger.warning("LocalHub answered 501 to:\n%s", "\n".join(hub.unhandled))
