"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

It answers what ``huggingface_hub`` 2.x sends for create_repo / create_commit / create_branch and
for repo_info / list_repo_tree / hf_hub_download / snapshot_download, with Xet disabled (see
../shared/HUB-PROTOCOL.md). State lives in memory. Tests can corrupt a served file, add a tag,
and read the requests it saw (to check the Authorization header).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class File:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:  # what the Hub calls the file's oid: sha256 for LFS, git sha1 otherwise
        return self.sha256 if self.lfs else git_sha1(self.data)


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, dict[str, File]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch, tag or refs/pr/N -> commit
    prs: int = 0

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


class HubState:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.corrupt: set[str] = set()  # file paths served with one byte flipped
        # JSON answers spoiled on purpose, by the request path's start: "garbage" (not JSON), "truncated" (the
        # connection closes halfway through the body), "no-url" (a commit's answer without its commitUrl)
        self.spoil: dict[str, str] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.commits_made = 0
        self.lock = threading.Lock()

    def new_commit(self, repo: Repo, files: dict[str, File]) -> str:
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[sha] = files
        return sha

    def tag(self, repo_id: str, tag: str, rev: str = "main") -> None:
        repo = self.repos[repo_id]
        repo.refs[tag] = repo.resolve(rev)  # type: ignore[assignment]


class Handler(BaseHTTPRequestHandler):
    server: HubServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None,
              head: bool = False) -> None:  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        path = self.path.split("?")[0]
        how = next((v for k, v in self.state.spoil.items() if path.startswith(k)), None)
        body = json.dumps(obj).encode()
        if how == "garbage":
            body = b"<html><body>502 Bad Gateway, from a proxy</body></html>"
        elif how == "no-url" and isinstance(obj, dict):
            body = json.dumps({k: v for k, v in obj.items() if k != "commitUrl"}).encode()
        elif how == "truncated":
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # socket.SHUT_RDWR: the rest never comes
            return
        self._send(status, body)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers=headers, head=head)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        return auth == f"Bearer {self.state.token}"

    def _segments(self) -> tuple[list[str], dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return [unquote(s) for s in parts.path.split("/") if s], parse_qs(parts.query)

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        with self.state.lock:
            self.state.requests.append((method, self.path, self.headers.get("Authorization")))
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.state.token}":
            self._error(401, None, "Invalid credentials in Authorization header", method == "HEAD")
            return
        seg, query = self._segments()
        try:
            route = _route(method, seg)
            if route is None:
                self._error(404, None, f"no route for {method} {self.path}", method == "HEAD")
                return
            name, args = route
            getattr(self, name)(*args, query=query)
        except BrokenPipeError:
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- upload -------------------------------------------------------------------------------------
    def create_repo(self, query) -> None:
        body = json.loads(self._body())
        if not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.state.repos:  # the Hub's 409 still carries the url; exist_ok=True reads it
            message = "You already created this model repo"
            body = {"error": message, "url": f"{self.server.url}/{repo_id}"}
            self._send(409, json.dumps(body).encode(), headers={"X-Error-Message": message})
            return
        repo = Repo(private=bool(body.get("private") or body.get("visibility") == "private"))
        repo.refs["main"] = self.state.new_commit(repo, {".gitattributes": File(b"*.safetensors filter=lfs\n", False)})
        self.state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, query) -> None:
        self._body()
        self._json(200, {"errors": [], "warnings": []})

    def create_branch(self, repo_id: str, branch: str, query) -> None:
        body = json.loads(self._body() or b"{}")
        if (repo := self._repo(repo_id)) is None:
            return
        if branch in repo.refs:
            self._error(409, None, "Reference already exists")
            return
        start = repo.resolve(body.get("startingPoint") or "main")
        repo.refs[branch] = start  # type: ignore[assignment]
        self._json(200, {})

    def preupload(self, repo_id: str, rev: str, query) -> None:
        body = json.loads(self._body())
        if (repo := self._repo(repo_id)) is None:
            return
        current = repo.commits.get(repo.resolve(rev) or "", {})
        files = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            binary = b"\0" in sample or not _is_text(sample)
            existing = current.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False,
                          "oid": existing.oid if existing else None})  # fmt: skip
        self._json(200, {"files": files})

    def lfs_batch(self, repo_id: str, query) -> None:
        body = json.loads(self._body())
        if self._repo(repo_id) is None:
            return
        objects = []
        for o in body["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self.server.url}/lfs-upload/{o['oid']}"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), "application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str, query) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, None, "content does not match oid")
            return
        self.state.lfs[oid] = data
        self._send(200)

    def commit(self, repo_id: str, rev: str, query) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if (repo := self._repo(repo_id)) is None:
            return
        if not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return
        head = repo.resolve(rev)
        if head is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        files = dict(repo.commits[head])
        for line in lines:
            v = line["value"]
            if line["key"] == "header" and v.get("parentCommit") and v["parentCommit"] != head:
                self._error(412, None, "A commit has happened since. Please refresh and try again.")
                return
            if line["key"] == "file":
                files[v["path"]] = File(base64.b64decode(v["content"]), False)
            elif line["key"] == "lfsFile":
                files[v["path"]] = File(self.state.lfs[v["oid"]], True)
            elif line["key"] == "deletedFile":
                files.pop(v["path"], None)
        sha = self.state.new_commit(repo, files)
        self.state.commits_made += 1
        answer = {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha}
        if query.get("create_pr", ["0"])[0] in ("1", "true", "True"):
            repo.prs += 1
            repo.refs[f"refs/pr/{repo.prs}"] = sha
            answer["pullRequestUrl"] = f"{self.server.url}/{repo_id}/discussions/{repo.prs}"
        else:
            repo.refs[rev] = sha
        self._json(200, answer)

    # -- download -------------------------------------------------------------------------------------
    def _commit(self, repo: Repo, rev: str, head: bool = False) -> str | None:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return sha

    def repo_info(self, repo_id: str, rev: str = "main", query=None) -> None:
        if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
            return
        files = repo.commits[sha]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "tags": [],
                         "siblings": [{"rfilename": p} for p in sorted(files)], "cardData": {}})  # fmt: skip

    def list_models(self, query) -> None:
        """``GET /api/models?author=&filter=&search=``: public repos (and the caller's private ones),
        tagged as the Hub tags them from the head commit's model card (``library_name``, ``tags``,
        ``base_model:adapter:<id>``); every ``filter`` must be among a repo's tags."""
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [None])[0]
        wanted = set(query.get("filter") or [])
        out = []
        for repo_id, repo in sorted(self.state.repos.items()):
            if repo.private and not self._authorized() or (author and not repo_id.startswith(author + "/")):
                continue
            if search and search not in repo_id or (sha := repo.resolve("main")) is None:
                continue
            tags = _card_tags(repo.commits[sha].get("README.md"))
            if wanted <= tags:
                out.append({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                            "tags": sorted(tags), "lastModified": "2026-01-01T00:00:00.000Z"})  # fmt: skip
        self._json(200, out)

    def tree(self, repo_id: str, rev: str, query) -> None:
        if (repo := self._repo(repo_id)) is None or (sha := self._commit(repo, rev)) is None:
            return
        out = []
        for path, f in sorted(repo.commits[sha].items()):
            entry = {"type": "file", "path": path, "size": len(f.data), "oid": git_sha1(f.data)}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            out.append(entry)
        self._json(200, out)

    def resolve(self, repo_id: str, rev: str, path: str, query, head: bool = False) -> None:
        if (repo := self._repo(repo_id, head)) is None or (sha := self._commit(repo, rev, head)) is None:
            return
        f = repo.commits[sha].get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", head)
            return
        data = f.data
        if path in self.state.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.oid}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(len(data))
        start = 0
        if (rng := self.headers.get("Range")) and rng.startswith("bytes="):
            start = int(rng[len("bytes=") :].split("-")[0] or 0)
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        self._send(206 if start else 200, body, "application/octet-stream", headers, head=head)

    def resolve_head(self, repo_id: str, rev: str, path: str, query) -> None:
        self.resolve(repo_id, rev, path, query, head=True)


def _card_tags(card: File | None) -> set[str]:
    """The tags the Hub derives from a model card's YAML front matter (what these tests need of it)."""
    if card is None or not card.data.startswith(b"---"):
        return set()
    front = card.data.decode().split("---")[1]
    tags, key = set(), None
    for line in front.splitlines():
        if line.startswith("- ") and key == "tags":
            tags.add(json.loads(line[2:]) if line[2:].startswith('"') else line[2:].strip())
        elif ":" in line:
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "library_name" and value:
                tags.add(value)
            if key == "base_model" and value:
                tags.add("base_model:adapter:" + (json.loads(value) if value.startswith('"') else value))
    return tags


def _is_text(sample: bytes) -> bool:
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _route(method: str, seg: list[str]) -> tuple[str, tuple] | None:
    """Map a request onto a handler method and its arguments (repo ids are ``ns/name``)."""
    if method == "GET" and seg == ["api", "models"]:
        return "list_models", ()
    if seg[:1] == ["api"]:
        if method == "POST" and seg[1:] == ["repos", "create"]:
            return "create_repo", ()
        if method == "POST" and seg[1:] == ["validate-yaml"]:
            return "validate_yaml", ()
        if len(seg) >= 4 and seg[1] == "models":
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if method == "GET" and not rest:
                return "repo_info", (repo_id,)
            if method == "GET" and rest[:1] == ["revision"]:
                return "repo_info", (repo_id, "/".join(rest[1:]))
            if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                return "tree", (repo_id, rest[1])
            if method == "POST" and rest[:1] == ["preupload"]:
                return "preupload", (repo_id, "/".join(rest[1:]))
            if method == "POST" and rest[:1] == ["commit"]:
                return "commit", (repo_id, "/".join(rest[1:]))
            if method == "POST" and rest[:1] == ["branch"]:
                return "create_branch", (repo_id, "/".join(rest[1:]))
        return None
    if method == "PUT" and seg[:1] == ["lfs-upload"]:
        return "lfs_upload", (seg[1],)
    if (
        method == "POST"
        and len(seg) >= 6
        and seg[1].endswith(".git")
        and seg[2:] == ["info", "lfs", "objects", "batch"]
    ):
        return "lfs_batch", (f"{seg[0]}/{seg[1][:-4]}",)
    if len(seg) >= 5 and seg[2] == "resolve":
        args = (f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        return ("resolve_head" if method == "HEAD" else "resolve"), args
    return None


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(token)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, name="test-hub", daemon=True).start()
        return self
