"""A fake Hugging Face Hub on 127.0.0.1 for end-to-end push / download tests (test code only).

It speaks the part of the Hub HTTP API that ``huggingface_hub`` (2.x) calls to create a repository, commit
files (``preupload`` → git-LFS ``batch`` → signed ``PUT`` to storage → ``verify`` → NDJSON ``commit``) and
download them again (``HEAD``/``GET`` on ``resolve/{revision}/{path}``, ``api/models/{repo}[/revision/{rev}]``,
``api/models/{repo}/tree/{rev}``), the way the real Hub answers:

* the API server checks a bearer token: a wrong token is answered ``401`` with ``X-Error-Message: Invalid
  credentials in Authorization header`` on every route; writes need the right token; private repositories are
  invisible without it;
* large files live on a separate "storage" server (another port, i.e. another origin, like S3 / the CDN): uploads
  go to a signed URL handed out by the LFS batch endpoint, downloads of LFS files are ``302`` redirects carrying
  ``X-Linked-Etag`` / ``X-Linked-Size`` / ``X-Repo-Commit``; regular files are served directly with ``ETag`` =
  git blob id;
* a commit is atomic: it references LFS objects uploaded to that repository (LFS storage is per repository) by
  sha256, is refused whole if anything is wrong, and moves the branch in one step;
* ``FakeHub.fail`` makes chosen requests fail (a store that refuses the second shard, a commit call that fails),
  to test a push that breaks half-way.

Not implemented (the client falls back or never calls them in these tests): Xet storage (run the client with
``HF_HUB_DISABLE_XET=1``), pull requests, branches other than ``main``, multipart LFS uploads, copies.

The servers run in daemon threads, bind 127.0.0.1 on free ports, refuse bodies above ``max_body`` bytes and stop
themselves after ``lifetime`` seconds.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.7z", "*.bin", "*.ckpt", "*.gz", "*.h5", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx",
                    "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar", "*.tflite", "*.zip", "*tfevents*")
)
REGULAR_MAX_BYTES = 10 * 1024 * 1024  # above this the Hub asks for LFS whatever the attributes say
REPO_ID = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Entry:
    """A file in a commit: inline ``content`` (regular) or a reference to an LFS object."""

    content: bytes | None = None
    lfs_oid: str | None = None
    size: int = 0

    @property
    def blob_id(self) -> str:
        return git_blob_id(self.content if self.lfs_oid is None else lfs_pointer(self.lfs_oid, self.size))


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, Entry]
    timestamp: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)
    # LFS objects verified for this repository: git-LFS storage is scoped to a repository, so an object another
    # repository uploaded is uploaded again (else one test's push would change what the next one sends).
    lfs_oids: set[str] = field(default_factory=set)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return next((c for c in self.commits if c.oid == oid or (len(revision) >= 7 and c.oid.startswith(revision))),
                    None)


@dataclass
class Fault:
    """An injected failure (``FakeHub.fail``); ``seen``/``failed`` count the matching requests and the refused ones."""

    method: str
    pattern: re.Pattern
    status: int
    message: str
    skip: int = 0
    seen: int = 0
    failed: int = 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """Start with ``with FakeHub() as hub:``; point clients at ``hub.url`` (``HF_ENDPOINT``) with ``hub.token``."""

    def __init__(self, token: str = "hf_fake_write_token", user: str = "a3-tester", lifetime: float = 1800.0,
                 max_body: int = 64 * 1024 * 1024):
        self.token, self.user, self.lifetime, self.max_body = token, user, lifetime, max_body
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS storage, by sha256
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.faults: list[Fault] = []  # injected failures, see fail()
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._servers: list[ThreadingHTTPServer] = []
        self._timer: threading.Timer | None = None

    # ---------------------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        self._api = self._serve(_ApiHandler)
        self._storage = self._serve(_StorageHandler)
        self.url = f"http://127.0.0.1:{self._api.server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self._storage.server_address[1]}"
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _serve(self, handler) -> ThreadingHTTPServer:
        server = _Server(("127.0.0.1", 0), handler)
        server.hub = self
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self._servers.append(server)
        return server

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------------------- inspection
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Contents of every file of ``repo_id`` at ``revision`` (LFS files resolved)."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            return {p: e.content if e.lfs_oid is None else self.objects[e.lfs_oid] for p, e in commit.files.items()}

    def commit_count(self, repo_id: str) -> int:
        with self._lock:
            return len(self.repos[repo_id].commits) if repo_id in self.repos else 0

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, int]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    # ---------------------------------------------------------------------- fault injection
    def fail(self, method: str, path_pattern: str, status: int, message: str, skip: int = 0) -> Fault:
        """From now on, answer ``method`` requests whose path matches the regex ``path_pattern`` (searched, on
        either server) with ``status`` and ``message`` (``X-Error-Message``), after letting the first ``skip``
        through: a connection that drops or a store that refuses mid-upload. ``faults.clear()`` ends it."""
        fault = Fault(method, re.compile(path_pattern), status, message, skip)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _injected_failure(self, method: str, path: str) -> HubError | None:
        with self._lock:
            for fault in self.faults:
                if fault.method == method and fault.pattern.search(path):
                    fault.seen += 1
                    if fault.seen > fault.skip:
                        fault.failed += 1
                        return HubError(fault.status, fault.message)
        return None

    # ------------------------------------------------------------------------------ helpers
    def sign(self, oid: str, action: str) -> str:
        return hmac.new(self._secret, f"{action}:{oid}".encode(), hashlib.sha256).hexdigest()

    def check_signature(self, oid: str, action: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(oid, action), signature or "")

    def storage_href(self, oid: str, action: str) -> str:
        return f"{self.storage_url}/{action}/{oid}?signature={self.sign(oid, action)}"

    def _new_commit(self, repo: Repo, parent: Commit | None, summary: str, description: str,
                    files: dict[str, Entry]) -> Commit:
        payload = json.dumps({"parent": parent.oid if parent else None, "summary": summary, "n": len(repo.commits),
                              "files": {p: e.blob_id for p, e in sorted(files.items())}}).encode()
        commit = Commit(hashlib.sha1(payload).hexdigest(), parent.oid if parent else None, summary, description, files)
        repo.commits.append(commit)
        repo.refs["main"] = commit.oid
        return commit


def _lfs_patterns(commit: Commit | None) -> list[str]:
    entry = commit.files.get(".gitattributes") if commit else None
    text = entry.content.decode() if entry is not None and entry.content is not None else DEFAULT_GITATTRIBUTES
    return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens up to 8 connections at once; the default backlog is 5


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stuck client connection is dropped
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def log_message(self, format, *args):  # noqa: A002 - keep test output clean
        pass

    # ------------------------------------------------------------------------------ bodies
    def read_body(self) -> bytes:
        if getattr(self, "_body_read", False):
            raise HubError(500, "request body read twice")
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > self.hub.max_body:
                    raise HubError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def read_json(self):
        try:
            return json.loads(self.read_body() or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"invalid JSON body: {exc}") from exc

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        # Log before answering: once the client has the response it may send its next request to the other
        # server, whose thread must not be able to log that request ahead of this one.
        with self.hub._lock:
            self.hub.log.append((self.command, self.path, status))
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", content_type)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj, headers: dict | None = None):
        self.send(status, json.dumps(obj).encode(), headers)

    def send_error_json(self, err: HubError):
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self.send_json(err.status, {"error": err.message, **err.extra}, headers)

    def dispatch(self):
        self._body_read = False
        path = unquote(urlsplit(self.path).path)
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        try:
            injected = self.hub._injected_failure(self.command, path)
            if injected is not None:
                raise injected
            for method, pattern, handler in self.routes:
                if method == self.command and (m := re.fullmatch(pattern, path)):
                    return handler(self, query=query, **m.groupdict())
            raise HubError(404, f"no route for {self.command} {path}")
        except HubError as err:
            self._drain()
            self.send_error_json(err)
        except Exception as exc:  # a bug in the fake: answer 500 instead of dropping the connection
            self._drain()
            self.send_error_json(HubError(500, f"fake Hub error: {type(exc).__name__}: {exc}"))

    def _drain(self):
        """Read an unread request body so the keep-alive connection stays usable."""
        if not self._body_read and self.command in ("POST", "PUT"):
            try:
                self.read_body()
            except Exception:  # noqa: BLE001
                self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = dispatch


class _ApiHandler(_Handler):
    # --------------------------------------------------------------------------------- auth
    def user(self, required: bool) -> str | None:
        """The authenticated user; 401 on a wrong token anywhere, and on a missing token if ``required``."""
        header = self.headers.get("Authorization")
        if header is None:
            if required:
                raise HubError(401, "You must be authenticated to do this (use a write token)")
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.hub.token):
            raise HubError(401, INVALID_CREDENTIALS)
        return self.hub.user

    def repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self.user(required=write)
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------------------- routes
    def whoami(self, query):
        user = self.user(required=True)
        self.send_json(200, {"type": "user", "id": "0" * 24, "name": user, "fullname": user,
                             "auth": {"type": "access_token",
                                      "accessToken": {"displayName": "fake", "role": "write"}}})

    def create_repo(self, query):
        user = self.user(required=True)
        body = self.read_json()
        namespace = body.get("organization") or user
        name = body.get("name") or ""
        if body.get("type", "model") not in (None, "model"):
            raise HubError(400, "only model repositories are supported by this fake Hub")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repository under {namespace}")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}", name) or name.endswith((".git", ".")) or "--" in name:
            raise HubError(400, f"Invalid repository name: {name!r}")
        repo_id = f"{namespace}/{name}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
            repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            self.hub._new_commit(repo, None, "initial commit", "",
                                 {".gitattributes": Entry(DEFAULT_GITATTRIBUTES.encode())})
            self.hub.repos[repo_id] = repo
        self.send_json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": "0" * 24})

    def validate_yaml(self, query):
        self.user(required=False)
        body = self.read_json()
        import yaml

        content = body.get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
                elif meta:
                    for key in ("tags", "datasets"):
                        if key in meta and not isinstance(meta[key], (list, str)):
                            errors.append({"message": f'"{key}" must be a list or a string'})
                    if "base_model" in meta and not isinstance(meta["base_model"], (list, str)):
                        errors.append({"message": '"base_model" must be a string or a list'})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
        warnings = [] if match else [{"message": "empty or missing yaml metadata in repo card"}]
        self.send_json(400 if errors else 200, {"errors": errors, "warnings": warnings})

    def model_info(self, query, repo, revision="main"):
        repo_obj = self.repo(repo)
        commit = self.commit(repo_obj, revision)
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path, "size": entry.size, "blobId": entry.blob_id}
            if entry.lfs_oid:
                sibling["lfs"] = {"sha256": entry.lfs_oid, "size": entry.size, "pointerSize": 134}
            siblings.append(sibling)
        config = {}
        if "config.json" in commit.files:
            try:
                full = json.loads(commit.files["config.json"].content)
                config = {k: full[k] for k in ("architectures", "model_type", "auto_map") if k in full}
            except (json.JSONDecodeError, TypeError):
                pass
        iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.timestamp))
        self.send_json(200, {
            "_id": "0" * 24, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid,
            "lastModified": iso, "createdAt": iso, "private": repo_obj.private, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers", "config": config,
            "siblings": siblings,
        })

    def tree(self, query, repo, revision, path=None):
        commit = self.commit(self.repo(repo), revision)
        path = (path or "").strip("/")
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        if path and path not in commit.files and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        out, dirs = [], set()
        for p, entry in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                dirs.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            item = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": p}
            if entry.lfs_oid:
                item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": 134}
            out.append(item)
        out = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + out
        self.send_json(200, out)

    def preupload(self, query, repo, revision):
        repo_obj = self.repo(repo, write=True)
        commit = self.commit(repo_obj, revision)
        patterns = _lfs_patterns(commit)
        files = []
        for item in self.read_json().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            existing = commit.files.get(path)
            lfs = (any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) or fnmatch.fnmatch(path, p) for p in patterns)
                   or size > REGULAR_MAX_BYTES or b"\0" in sample or (existing is not None and existing.lfs_oid))
            oid = None
            if existing is not None:
                oid = existing.lfs_oid if existing.lfs_oid else git_blob_id(existing.content)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self.send_json(200, {"files": files, "commitOid": commit.oid})

    def lfs_batch(self, query, repo):
        repo_obj = self.repo(repo, write=True)
        body = self.read_json()
        if body.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        if "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "this fake Hub only offers the basic transfer")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            out = {"oid": oid, "size": size, "authenticated": True}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                out["error"] = {"code": 422, "message": f"invalid oid {oid}"}
            elif size > self.hub.max_body:
                out["error"] = {"code": 422, "message": f"object too large ({size} bytes)"}
            elif oid not in repo_obj.lfs_oids or self.hub.objects.get(oid) is None:
                out["actions"] = {
                    "upload": {"href": self.hub.storage_href(oid, "upload"), "expires_in": 3600},
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(out)
        self.send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                  content_type="application/vnd.git-lfs+json")

    def lfs_verify(self, query, repo):
        repo_obj = self.repo(repo, write=True)
        body = self.read_json()
        data = self.hub.objects.get(body.get("oid"))
        if data is None or len(data) != int(body.get("size", -1)):
            raise HubError(404, f"object {body.get('oid')} was not uploaded")
        with self.hub._lock:
            repo_obj.lfs_oids.add(body["oid"])
        self.send_json(200, {"message": "ok"})

    def commit_api(self, query, repo, revision):
        repo_obj = self.repo(repo, write=True)
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by this fake Hub")
        if revision != "main":
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first NDJSON line must be the commit header")
        header = lines[0]["value"]
        with self.hub._lock:
            parent = self.commit(repo_obj, revision)
            if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"invalid path {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, "regular files must be base64-encoded")
                    content = base64.b64decode(value["content"])
                    files[path] = Entry(content=content, size=len(content))
                elif key == "lfsFile":
                    data = self.hub.objects.get(value.get("oid"))
                    if data is None or value.get("oid") not in repo_obj.lfs_oids or value.get("algo") != "sha256":
                        raise HubError(422, f"LFS object {value.get('oid')} for {path} was never uploaded")
                    if "size" in value and int(value["size"]) != len(data):
                        raise HubError(422, f"size mismatch for {path}")
                    files[path] = Entry(lfs_oid=value["oid"], size=len(data))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            commit = self.hub._new_commit(repo_obj, parent, header.get("summary") or "", header.get("description", ""),
                                          files)
        self.send_json(200, {"success": True, "commitOid": commit.oid,
                             "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}", "hookOutput": ""})

    def resolve(self, query, repo, revision, path):
        repo_obj = self.repo(repo)
        commit = self.commit(repo_obj, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        if entry.lfs_oid is not None:  # like the Hub: redirect to the storage host, metadata on the redirect
            headers.update({"Location": self.hub.storage_href(entry.lfs_oid, "objects"),
                            "X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size),
                            "ETag": f'"{entry.blob_id}"'})
            return self.send(302, b"", headers)
        headers["ETag"] = f'"{entry.blob_id}"'
        self.send(200, entry.content, headers, content_type="application/octet-stream")

    routes = [
        ("GET", r"/api/whoami-v2", whoami),
        ("POST", r"/api/repos/create", create_repo),
        ("POST", r"/api/validate-yaml", validate_yaml),
        ("GET", rf"/api/models/{REPO_ID}", model_info),
        ("GET", rf"/api/models/{REPO_ID}/revision/(?P<revision>[^/]+)", model_info),
        ("GET", rf"/api/models/{REPO_ID}/tree/(?P<revision>[^/]+)(?P<path>/.*)?", tree),
        ("POST", rf"/api/models/{REPO_ID}/preupload/(?P<revision>[^/]+)", preupload),
        ("POST", rf"/{REPO_ID}\.git/info/lfs/objects/batch", lfs_batch),
        ("POST", rf"/{REPO_ID}\.git/info/lfs/objects/verify", lfs_verify),
        ("POST", rf"/api/models/{REPO_ID}/commit/(?P<revision>[^/]+)", commit_api),
        ("HEAD", rf"/{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", resolve),
        ("GET", rf"/{REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", resolve),
    ]


class _StorageHandler(_Handler):
    """The object store: signed PUT (upload) and GET/HEAD (download) URLs, no bearer token."""

    def upload(self, query, oid):
        if not self.hub.check_signature(oid, "upload", query.get("signature")):
            raise HubError(403, "invalid or missing signature")
        data = self.read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256 oid")
        with self.hub._lock:
            self.hub.objects[oid] = data
        self.send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def download(self, query, oid):
        if not self.hub.check_signature(oid, "objects", query.get("signature")):
            raise HubError(403, "invalid or missing signature")
        data = self.hub.objects.get(oid)
        if data is None:
            raise HubError(404, "no such object")
        self.send(200, data, {"ETag": f'"{oid}"'}, content_type="application/octet-stream")

    routes = [
        ("PUT", r"/upload/(?P<oid>[0-9a-f]{64})", upload),
        ("GET", r"/objects/(?P<oid>[0-9a-f]{64})", download),
        ("HEAD", r"/objects/(?P<oid>[0-9a-f]{64})", download),
    ]



# ------------------------------------------------------------------------------ client plumbing
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")  # dropped in either case
_NO_PROXY = "127.0.0.1,localhost"


def client_env(hub: FakeHub, hf_home: str, **extra: str) -> dict[str, str]:
    """Environment for a subprocess whose ``huggingface_hub`` talks to ``hub`` only (read at import time)."""
    import os

    dropped_prefixes = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(dropped_prefixes) and k != "PYTHONPATH" and k.lower() not in _PROXY_VARIABLES}
    # Generous client timeouts (defaults: 10 s): a busy 2-core CI machine can be slow to answer.
    env.update(HF_ENDPOINT=hub.url, HF_HOME=hf_home, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="120", HF_HUB_DOWNLOAD_TIMEOUT="120",
               NO_PROXY=_NO_PROXY, no_proxy=_NO_PROXY, **extra)
    return env


def patch_client(monkeypatch, hub: FakeHub, hf_home: str) -> None:
    """Point this process's ``huggingface_hub`` at ``hub`` (its constants are read at import, so patch them).

    Xet is disabled so uploads take the LFS path (preupload → batch → PUT → verify → commit) the fake speaks.
    """
    import os

    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(hf_home, "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(hf_home, "stored_tokens"), raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    for name in _PROXY_VARIABLES:  # as in client_env: the fake Hub on 127.0.0.1 is never proxied
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("NO_PROXY", _NO_PROXY)
    monkeypatch.setenv("no_proxy", _NO_PROXY)
    # huggingface_hub reuses one HTTP client, which reads the proxy settings when it is created: drop any
    # client an earlier test made, so the next one is built with the settings above.
    huggingface_hub.close_session()
