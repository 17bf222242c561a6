"""A small Hugging Face Hub stand-in on loopback, speaking the API subset the real `huggingface_hub` client uses.

Endpoints: ``whoami-v2``, ``repos/create``, ``repos/delete``, model info (``/api/models/{id}[/revision/{rev}]``),
tree listing, ``paths-info``, ``preupload`` (always ``uploadMode: regular``, so no LFS/Xet), NDJSON ``commit``,
``validate-yaml`` and ``GET``/``HEAD`` ``/{id}/resolve/{rev}/{path}`` with ``ETag``/``X-Repo-Commit`` headers.

A commit is parsed completely before anything is stored, then applied under a lock: a request that fails or is cut
midway leaves the repository as it was. Switches for tests:

- ``server.fail("commit", status=503, times=1)`` answers the next matching request(s) with that status;
- ``server.fail("commit", drop=True)`` reads part of the upload body, then closes the connection without answering.

Private repositories are visible only with their owner's token. A test fixture, not a product feature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

ALLOWED_RELATIONS = ("adapter", "merge", "quantized", "finetune")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Commit | None:
        if revision in ("main", "HEAD"):
            return self.head
        for commit in self.commits:
            if commit.oid == revision or (len(revision) >= 7 and commit.oid.startswith(revision)):
                return commit
        return None


@dataclass
class _Failure:
    endpoint: str
    status: int
    times: int
    drop: bool


class HubServer:
    """Start with ``HubServer(tokens={"hf_test": "alice"}).start()``; ``.url`` is the endpoint; ``.stop()``."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._failures: list[_Failure] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---- test switches -------------------------------------------------------------------------------------
    def fail(self, endpoint: str, *, status: int = 500, times: int = 1, drop: bool = False) -> None:
        """Make the next ``times`` requests to ``endpoint`` ("commit", "preupload", "resolve", ...) fail."""
        with self.lock:
            self._failures.append(_Failure(endpoint, status, times, drop))

    def clear_failures(self) -> None:
        with self.lock:
            self._failures.clear()

    def take_failure(self, endpoint: str) -> _Failure | None:
        with self.lock:
            for failure in self._failures:
                if failure.endpoint == endpoint and failure.times > 0:
                    failure.times -= 1
                    return failure
        return None

    # ---- state helpers for assertions ----------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return dict(self.repos[repo_id].resolve(revision).files)

    def commit_count(self, repo_id: str) -> int:
        with self.lock:
            return len(self.repos[repo_id].commits)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # ---- plumbing ------------------------------------------------------------------------------------------
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return self.hub.tokens.get(auth[len("Bearer "):].strip())

    def _has_bad_token(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and self._user() is None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _maybe_fail(self, endpoint: str) -> bool:
        failure = self.hub.take_failure(endpoint)
        if failure is None:
            return False
        if failure.drop:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length // 2)
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        self._body()
        self._error(failure.status, f"simulated failure of {endpoint}")
        return True

    def _repo_for_read(self, repo_id: str) -> Repo | None:
        """The repo if the caller may see it; otherwise answers 401/404 like the Hub and returns None."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self._user() != repo.owner):
            if self._has_bad_token():
                self._error(401, "Invalid credentials in Authorization header")
            else:
                self._error(404 if self._user() else 401, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _repo_for_write(self, repo_id: str) -> Repo | None:
        user = self._user()
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self._repo_for_read(repo_id)
        if repo is not None and repo.owner != user:
            self._error(403, "You don't have the rights to write to this repository")
            return None
        return repo

    # ---- routing -------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        self.hub.requests.append((method, path))
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.create_repo),
            ("DELETE", r"/api/repos/delete", self.delete_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self.tree),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", self.paths_info),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self.model_info),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                handler(query=query, **{k: v for k, v in match.groupdict().items()})
                return
        self._body()
        self._error(404, f"no such endpoint in the test hub: {method} {path}")

    # ---- endpoints -----------------------------------------------------------------------------------------
    def whoami(self, query: dict) -> None:
        user = self._user()
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return
        self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def create_repo(self, query: dict) -> None:
        if self._maybe_fail("create"):
            return
        payload = json.loads(self._body() or b"{}")
        user = self._user()
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return
        owner = payload.get("organization") or user
        if owner != user:
            self._error(403, f"You don't have the rights to create a model under the namespace {owner!r}")
            return
        repo_id = f"{owner}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                self._json(409, {"error": "You already created this model repo", "url": url})
                return
            private = payload.get("private", payload.get("visibility") == "private")
            repo = Repo(repo_id, owner, bool(private))
            repo.commits.append(Commit(uuid.uuid4().hex + "0" * 8, None, "initial commit", "",
                                       {".gitattributes": GITATTRIBUTES}))
            self.hub.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self, query: dict) -> None:
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization') or self._user()}/{payload['name']}"
        if self._repo_for_write(repo_id) is None:
            return
        with self.hub.lock:
            del self.hub.repos[repo_id]
        self._send(200)

    def validate_yaml(self, query: dict) -> None:
        content = json.loads(self._body() or b"{}").get("content", "")
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as exc:
                meta, errors = {}, [{"message": f"invalid YAML: {exc}"}]
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
                meta = {}
            relation = meta.get("base_model_relation")
            if relation is not None and relation not in ALLOWED_RELATIONS:
                errors.append({"message": f'"base_model_relation" must be one of {", ".join(ALLOWED_RELATIONS)}'})
            if relation is not None and "base_model" not in meta:
                errors.append({"message": '"base_model_relation" needs "base_model"'})
            for key in ("tags", "datasets"):
                value = meta.get(key)
                if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    errors.append({"message": f'"{key}" must be a list of strings'})
            for entry in meta.get("model-index") or []:
                for result in entry.get("results", []):
                    if "type" not in result.get("task", {}) or "type" not in result.get("dataset", {}):
                        errors.append({"message": "model-index results need task.type and dataset.type"})
                    for metric in result.get("metrics", []):
                        if "type" not in metric or "value" not in metric:
                            errors.append({"message": "model-index metrics need type and value"})
        if errors:
            self._json(400, {"errors": errors, "warnings": []})
        else:
            self._json(200, {"errors": [], "warnings": []})

    def _commit_for_read(self, repo: str, rev: str) -> tuple:
        """The repo and the commit ``rev`` names, or (.., None) after answering 404 (repo or revision missing)."""
        found = self._repo_for_read(repo)
        if found is None:
            return None, None
        commit = found.resolve(rev)
        if commit is None:
            self._error(404, "Invalid rev id", "RevisionNotFound")
        return found, commit

    def _info_for(self, repo: Repo, commit: Commit) -> dict:
        return {
            "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.owner,
            "sha": commit.oid, "private": repo.private, "disabled": False, "gated": False,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "tags": [], "downloads": 0, "likes": 0, "library_name": "transformers",
            "siblings": [{"rfilename": name} for name in sorted(commit.files)],
        }

    def model_info(self, query: dict, repo: str, rev: str | None) -> None:
        found, commit = self._commit_for_read(repo, rev or "main")
        if commit is None:
            return
        self._json(200, self._info_for(found, commit))

    @staticmethod
    def _entry(path: str, content: bytes) -> dict:
        return {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}

    def tree(self, query: dict, repo: str, rev: str, sub: str | None) -> None:
        _, commit = self._commit_for_read(repo, rev)
        if commit is None:
            return
        prefix = f"{sub.strip('/')}/" if sub else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            entries.append(self._entry(name, commit.files[name]))
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(200, entries)

    def paths_info(self, query: dict, repo: str, rev: str) -> None:
        raw = self._body().decode()
        _, commit = self._commit_for_read(repo, rev)
        if commit is None:
            return
        try:
            paths = json.loads(raw).get("paths", [])
        except json.JSONDecodeError:
            paths = parse_qs(raw).get("paths", [])
        self._json(200, [self._entry(p, commit.files[p]) for p in paths if p in commit.files])

    def preupload(self, query: dict, repo: str, rev: str) -> None:
        if self._maybe_fail("preupload"):
            return
        payload = json.loads(self._body() or b"{}")
        found = self._repo_for_write(repo)
        if found is None:
            return
        commit = found.resolve(rev)
        files = []
        for item in payload.get("files", []):
            existing = commit.files.get(item["path"]) if commit else None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_oid(existing) if existing is not None else None})
        self._json(200, {"files": files, "commitOid": commit.oid if commit else None})

    def commit(self, query: dict, repo: str, rev: str) -> None:
        if self._maybe_fail("commit"):
            return
        body = self._body()
        found = self._repo_for_write(repo)
        if found is None:
            return
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError:
            self._error(400, "malformed NDJSON commit payload")
            return
        if not lines or lines[0].get("key") != "header":
            self._error(400, "the commit payload must start with a header line")
            return
        header = lines[0]["value"]
        with self.hub.lock:
            head = found.resolve(rev)
            if head is None or head is not found.head:
                self._error(400, f"cannot commit to revision {rev!r}: only the head of main is writable")
                return
            parent = header.get("parentCommit")
            if parent and not head.oid.startswith(parent):
                self._error(412, f"A commit has happened since. Parent {parent} is not the head {head.oid}")
                return
            files = dict(head.files)
            for line in lines[1:]:
                value = line.get("value", {})
                if line.get("key") == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line.get("key") == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                        return
                elif line.get("key") == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {k: v for k, v in files.items() if not k.startswith(prefix)}
                else:
                    self._error(400, f"unsupported commit operation {line.get('key')!r} (this hub has no LFS)")
                    return
            oid = hashlib.sha1(f"{head.oid}{time.time_ns()}{uuid.uuid4()}".encode()).hexdigest()
            found.commits.append(Commit(oid, head.oid, header.get("summary", ""), header.get("description", ""),
                                        files))
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}",
                         "pullRequestUrl": None})

    def resolve(self, query: dict, repo: str, rev: str, file: str) -> None:
        if self._maybe_fail("resolve"):
            return
        _, commit = self._commit_for_read(repo, rev)
        if commit is None:
            return
        content = commit.files.get(file)
        if content is None:
            self._error(404, "Entry not found", "EntryNotFound")
            return
        headers = {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        self._send(200, content, headers, content_type="application/octet-stream")
