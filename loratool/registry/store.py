"""The adapter registry: a local catalog of adapter versions, with no server and no daemon.

Layout under ``LORATOOL_HOME`` (default ``$XDG_CACHE_HOME/loratool``, else ``~/.cache/loratool``):

- ``blobs/sha256/ab/abcdef...``: every file of every registered adapter, once, named by its
  sha256 and read-only. Adding copies a file in (never links the user's file: editing it later
  must not change what was registered); a blob is written to a temporary name and renamed, so a
  blob that exists is whole;
- ``views/<entry digest>/``: an adapter directory made of hard links to the blobs (copies where
  the file system has no hard links), which commands read when given a reference;
- ``registry.db``: the index, SQLite in WAL mode. Every change is one ``BEGIN IMMEDIATE``
  transaction, so concurrent writers queue and none loses anything; a killed writer's transaction
  is rolled back by SQLite and its lock released with its process. ``PRAGMA user_version`` is the
  schema version; :data:`MIGRATIONS` brings an older database up to date.

An entry is one version of a named adapter: ``NAME@vN`` (N counts from 1 per name). Its digest is
the sha256 of its manifest (each file's name and sha256), so the same files are the same entry.
Aliases (``NAME@prod``) point at one version of their name and move. References, wherever a
command takes an adapter path: ``NAME`` (the newest version), ``NAME@vN``, ``NAME@ALIAS`` and
``sha256:PREFIX`` (of an entry digest or of a file in it). A path that exists always wins.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoraToolError
from ..io.atomic import HOST, writer_gone
from .home import default_home, make_private_dir

SCHEMA_VERSION = 1
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE entries (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        format TEXT NOT NULL,
        weights TEXT NOT NULL,          -- the file commands read: a directory's or the kohya file
        created TEXT NOT NULL,
        description TEXT,
        base_model TEXT,
        operation TEXT,                 -- provenance: what made it (extract, combine, ...)
        provenance TEXT,                -- the whole record, JSON
        modules INTEGER NOT NULL,
        ranks TEXT NOT NULL,            -- JSON list
        parameters INTEGER NOT NULL,
        UNIQUE (name, version)
    );
    CREATE INDEX entries_digest ON entries (digest);
    CREATE TABLE files (entry INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
                        path TEXT NOT NULL, blob TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (entry, path));
    CREATE INDEX files_blob ON files (blob);
    CREATE TABLE tags (entry INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
                       key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (entry, key));
    CREATE TABLE aliases (name TEXT NOT NULL, alias TEXT NOT NULL,
                          entry INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
                          PRIMARY KEY (name, alias));
    -- what the entry's tensors must find in a base: module weight or whole tensor -> shape
    -- (alt: the other orientation a 3-D experts parameter may be stored in; else the shape again)
    CREATE TABLE targets (entry INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
                          tensor TEXT NOT NULL, shape TEXT NOT NULL, alt TEXT NOT NULL, PRIMARY KEY (entry, tensor));
    -- provenance inputs by digest: lineage in both directions
    CREATE TABLE inputs (entry INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
                         sha256 TEXT NOT NULL, path TEXT NOT NULL, role TEXT NOT NULL);
    CREATE INDEX inputs_sha ON inputs (sha256);
    -- where an entry went or came from: pushed to / pulled from a Hub repo, merged into a checkpoint
    CREATE TABLE events (entry INTEGER NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
                         kind TEXT NOT NULL, target TEXT NOT NULL, detail TEXT, at TEXT NOT NULL);
    """,
}
_REF = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._/+-]*?)(?:@(?P<at>[A-Za-z0-9._-]+))?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")
_VERSION = re.compile(r"v(\d+)")


class RegistryError(LoraToolError, LookupError):
    """A reference names nothing, or more than one thing; a name or alias is malformed."""


# The files an adapter consists of, by format (PEFT, mlx-lm; a kohya adapter is one file), and its card:
# registry add stores these and nothing else from a folder (a .env or notes beside an adapter stay out).
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                           "adapters.safetensors", "README.md"})  # fmt: skip


def adapter_files(src: Path) -> list[Path]:
    """The files ``registry add`` stores from ``src`` (a folder, or one file): the adapter's own, each
    a file inside the folder, not a link leading out of it.

    Raises:
        RegistryError: a file of the adapter is a link that leaves its folder.
    """
    if not src.is_dir():
        return [src]
    files = sorted(p for p in src.iterdir() if p.name in ADAPTER_FILES and p.is_file())
    home = Path(os.path.realpath(src))
    for f in files:
        real = Path(os.path.realpath(f))
        if f.is_symlink() and home not in real.parents:
            raise RegistryError(
                f"'{f.name}' is a link to {real}, outside the adapter's folder: registry add stores only files "
                "that lie in it", path=str(src),
                fix="copy the adapter with its files resolved (cp -rL SRC DEST), then add the copy",
            )  # fmt: skip
    return files


def _private_dir(path: Path) -> None:
    """:func:`make_private_dir`, its failure a RegistryError that names the folder."""
    try:
        make_private_dir(path)
    except OSError as e:
        raise RegistryError(
            f"cannot use the registry's folder ({e.strerror or e})", path=str(e.filename or path),
            fix="set LORATOOL_HOME to a folder you can write (it is a file, or not yours, now)",
        ) from None  # fmt: skip


def looks_like_ref(text: str) -> bool:
    return text.startswith("sha256:") or _REF.fullmatch(text) is not None


@dataclass
class Entry:
    """One registered adapter version."""

    id: int
    name: str
    version: int
    digest: str
    format: str
    weights: str
    created: str
    description: str | None
    base_model: str | None
    operation: str | None
    modules: int
    ranks: list[int]
    parameters: int
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (path, sha256, size)
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    events: list[dict[str, str]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "name": self.name, "version": self.version, "digest": f"sha256:{self.digest}",
            "format": self.format, "created": self.created, "description": self.description,
            "base_model": self.base_model, "operation": self.operation, "modules": self.modules,
            "ranks": self.ranks, "parameters": self.parameters, "aliases": self.aliases, "tags": self.tags,
            "files": [{"path": p, "sha256": s, "size": n} for p, s, n in self.files], "events": self.events,
        }  # fmt: skip


@dataclass
class Facts:
    """What the registry records about an adapter, read by the caller (the registry reads no tensors)."""

    format: str
    weights: str  # the file commands read, relative to the adapter directory (or the file itself)
    modules: int
    ranks: list[int]
    parameters: int
    targets: dict[str, tuple[int, ...]]
    base_model: str | None = None
    alternatives: dict[str, tuple[int, ...]] = field(default_factory=dict)  # target -> its other stored shape
    provenance: dict[str, Any] | None = None


class Registry:
    """The catalog at ``home``; opening it creates nothing until something is added."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.db_path = self.home / "registry.db"
        self.blobs = self.home / "blobs" / "sha256"
        self.views = self.home / "views"

    @property
    def exists(self) -> bool:
        """Whether a catalog is there (a home or catalog of the wrong kind is an error, not an empty registry)."""
        if self.home.exists() and not self.home.is_dir():
            raise RegistryError(
                "the registry's home is not a folder", path=str(self.home),
                fix="set LORATOOL_HOME to a folder (or move aside what stands at that path)",
            )  # fmt: skip
        if self.db_path.exists() and not self.db_path.is_file():
            raise RegistryError(
                "the registry's catalog is not a file", path=str(self.db_path),
                fix="move aside what stands at that path, or set LORATOOL_HOME to another folder",
            )  # fmt: skip
        return self.db_path.is_file()

    def check_usable(self) -> None:
        """Open (or create) the catalog now, so that a command with ``--register`` fails before its work.

        Raises:
            RegistryError: the store cannot be created or opened.
        """
        _ = self.exists  # a home or catalog of the wrong kind is refused here
        with self._connect(write=True):
            pass

    # -- the database -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        if not self.exists and not write:
            raise RegistryError(
                "the registry is empty", path=str(self.home), fix="add an adapter: loratool registry add"
            )
        try:
            _private_dir(self.home)
            new = not self.db_path.exists()
            con = sqlite3.connect(self.db_path, timeout=_BUSY_SECONDS, isolation_level=None)
            if new:
                os.chmod(self.db_path, 0o600)  # its journal and WAL files take the database's mode
        except (OSError, sqlite3.Error) as e:
            raise RegistryError(f"cannot open the registry ({e})", path=str(self.db_path),
                                fix="check LORATOOL_HOME and its permissions") from None  # fmt: skip
        try:
            _journal_in_wal(con)
            con.execute("PRAGMA foreign_keys=ON")
            con.execute(f"PRAGMA busy_timeout={int(_BUSY_SECONDS * 1000)}")
            self._migrate(con)
            yield con
        except sqlite3.DatabaseError as e:  # not a database, corrupt, read-only, locked past the timeout
            raise RegistryError(
                f"the registry's index cannot be used ({e})", path=str(self.db_path), fix=_index_fix(e)
            ) from None
        finally:
            con.close()

    @staticmethod
    def _migrate(con: sqlite3.Connection) -> None:
        current = con.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise RegistryError(
                f"the registry's schema is version {current}, newer than this loratool's ({SCHEMA_VERSION})",
                fix="upgrade loratool",
            )
        if current == SCHEMA_VERSION:
            return
        with _transaction(con):
            current = con.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
            for version in range(current + 1, SCHEMA_VERSION + 1):  # (executescript would commit midway)
                for statement in _statements(MIGRATIONS[version]):
                    con.execute(statement)
                con.execute(f"PRAGMA user_version={version}")

    # -- adding -----------------------------------------------------------------------------
    def add(
        self,
        source: str | os.PathLike[str],
        facts: Facts,
        *,
        name: str,
        aliases: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        event: tuple[str, str, str | None] | None = None,
    ) -> tuple[Entry, bool]:
        """Register the adapter at ``source`` (a directory or a file) as the next version of ``name``.

        Returns ``(entry, created)``: the same files registered under ``name`` before give that
        version back (``created`` False), with the new aliases and tags applied.
        """
        check_name(name)
        for a in aliases:
            _check_alias(a)
        src = Path(source)
        files = adapter_files(src)
        stored = [(f.name, self._store_blob(f), f.stat().st_size) for f in files]
        digest = _manifest_digest(stored)
        with self._connect(write=True) as con, _transaction(con):
            for _, blob, _ in stored:  # a gc between storing and now may have taken an unreferenced blob
                if not self._blob(blob).is_file():
                    self._store_blob(next(f for f in files if f.name == _path_of(stored, blob)))
            row = con.execute("SELECT id FROM entries WHERE name = ? AND digest = ?", (name, digest)).fetchone()
            created = row is None
            if created:
                version = con.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM entries WHERE name = ?",
                                      (name,)).fetchone()[0]  # fmt: skip
                record = facts.provenance or {}
                cur = con.execute(
                    "INSERT INTO entries (name, version, digest, format, weights, created, description, base_model,"
                    " operation, provenance, modules, ranks, parameters) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (name, version, digest, facts.format, facts.weights, _now(), description, facts.base_model,
                     record.get("operation"), json.dumps(record, sort_keys=True) if record else None, facts.modules,
                     json.dumps(facts.ranks), facts.parameters),
                )  # fmt: skip
                entry_id = int(cur.lastrowid or 0)
                con.executemany("INSERT INTO files VALUES (?,?,?,?)", [(entry_id, p, b, n) for p, b, n in stored])
                con.executemany("INSERT INTO targets VALUES (?,?,?,?)", [
                    (entry_id, t, _shape_text(s), _shape_text(facts.alternatives.get(t, s)))
                    for t, s in sorted(facts.targets.items())
                ])  # fmt: skip
                con.executemany("INSERT INTO inputs VALUES (?,?,?,?)",
                                [(entry_id, *i) for i in _inputs(record)])  # fmt: skip
            else:
                entry_id = int(row[0])
            if description is not None and not created:
                con.execute("UPDATE entries SET description = ? WHERE id = ?", (description, entry_id))
            for key, value in (tags or {}).items():
                con.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", (entry_id, key, value))
            for a in aliases:
                con.execute("INSERT OR REPLACE INTO aliases VALUES (?,?,?)", (name, a, entry_id))
            if event is not None:
                con.execute("INSERT INTO events VALUES (?,?,?,?,?)", (entry_id, *event, _now()))
            return self._entry(con, entry_id), created

    def _blob(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def _store_blob(self, file: Path) -> str:
        """Copy ``file`` in under its sha256 (hashed while copying); an existing blob is kept.

        Raises:
            RegistryError: the copy failed (a full disk, say); no partial blob is left.
        """
        _private_dir(self.home)
        tmp_dir = self.home / "tmp"
        _private_dir(tmp_dir)
        _sweep_parts(tmp_dir)
        tmp = tmp_dir / f"{HOST}-{os.getpid()}-{uuid.uuid4().hex}.part"
        h = hashlib.sha256()
        try:
            with (
                open(file, "rb") as src,
                os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst,
            ):
                while block := src.read(1 << 24):
                    h.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            sha = h.hexdigest()
            target = self._blob(sha)
            if target.is_file():
                return sha
            _private_dir(target.parent)
            os.chmod(tmp, 0o400)  # read-only, and the owner's alone: an adapter may be private
            os.replace(tmp, target)
            return sha
        except OSError as e:
            raise RegistryError(
                f"cannot store '{file.name}' in the registry ({e.strerror or e})", path=str(self.home),
                fix="free space on the registry's disk (LORATOOL_HOME), or point LORATOOL_HOME at a roomier one",
            ) from None  # fmt: skip
        finally:
            tmp.unlink(missing_ok=True)

    # -- reading ----------------------------------------------------------------------------
    def _entry(self, con: sqlite3.Connection, entry_id: int) -> Entry:
        row = con.execute(
            "SELECT id, name, version, digest, format, weights, created, description, base_model, operation,"
            " modules, ranks, parameters FROM entries WHERE id = ?",
            (entry_id,),
        ).fetchone()
        entry = _entry_from_row(row)
        entry.files = [(str(p), str(b), int(n)) for p, b, n in con.execute(
            "SELECT path, blob, size FROM files WHERE entry = ? ORDER BY path", (entry_id,))]  # fmt: skip
        entry.tags = dict(con.execute("SELECT key, value FROM tags WHERE entry = ? ORDER BY key", (entry_id,)))
        entry.aliases = [r[0] for r in con.execute("SELECT alias FROM aliases WHERE entry = ? ORDER BY alias",
                                                   (entry_id,))]  # fmt: skip
        entry.events = [
            {"kind": k, "target": t, "detail": d or "", "at": at}
            for k, t, d, at in con.execute(
                "SELECT kind, target, detail, at FROM events WHERE entry = ? ORDER BY at", (entry_id,)
            )  # fmt: skip
        ]
        return entry

    def resolve(self, ref: str) -> Entry:
        """The entry ``ref`` names (see the module docstring for the forms)."""
        with self._connect() as con:
            return self._entry(con, self._resolve_id(con, ref))

    def _resolve_id(self, con: sqlite3.Connection, ref: str) -> int:
        if ref.startswith("sha256:"):
            prefix = ref[len("sha256:") :].lower()
            if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
                raise RegistryError(f"{ref!r}: give at least 4 hex digits after sha256:")
            ids = {r[0] for r in con.execute("SELECT id FROM entries WHERE digest LIKE ?", (prefix + "%",))}
            if not ids:
                ids = {r[0] for r in con.execute("SELECT entry FROM files WHERE blob LIKE ?", (prefix + "%",))}
            if len(ids) > 1:
                names = [self._entry(con, i).ref for i in sorted(ids)][:5]
                raise RegistryError(f"{ref} names {len(ids)} entries ({', '.join(names)})", fix="give more digits")
            if not ids:
                raise RegistryError(f"no registered adapter has digest {ref}")
            return int(ids.pop())
        m = _REF.fullmatch(ref)
        if m is None:
            raise RegistryError(f"{ref!r} is neither a path nor a reference (NAME, NAME@vN, NAME@ALIAS, sha256:...)")
        name, at = m["name"], m["at"]
        if at is None:
            row = con.execute("SELECT id FROM entries WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
        elif v := _VERSION.fullmatch(at):
            version = int(v[1])  # past SQLite's integers no version can be: none found
            row = None if version >= 2**63 else con.execute(
                "SELECT id FROM entries WHERE name = ? AND version = ?", (name, version)).fetchone()  # fmt: skip
        else:
            row = con.execute("SELECT entry FROM aliases WHERE name = ? AND alias = ?", (name, at)).fetchone()
        if row is None:
            raise RegistryError(f"no registered adapter {ref}", fix="loratool registry ls lists them")
        return int(row[0])

    def entries(self, *, name_glob: str | None = None, compatible_with: Mapping[str, tuple[int, ...]] | None = None
             ) -> list[Entry]:  # fmt: skip
        """Every entry (newest version first within a name), optionally only those whose every
        target tensor is in ``compatible_with`` (a base's tensor -> shape) with that shape."""
        if not self.exists:
            return []
        with self._connect() as con:
            sql = "SELECT id, name FROM entries"
            args: list[Any] = []
            if compatible_with is not None:
                con.execute("CREATE TEMP TABLE base (tensor TEXT PRIMARY KEY, shape TEXT NOT NULL)")
                con.executemany("INSERT INTO base VALUES (?, ?)",
                                [(k, _shape_text(s)) for k, s in compatible_with.items()])  # fmt: skip
                sql += (" WHERE EXISTS (SELECT 1 FROM targets t WHERE t.entry = entries.id) AND NOT EXISTS"
                        " (SELECT 1 FROM targets t LEFT JOIN base b"
                        "  ON b.tensor = t.tensor AND b.shape IN (t.shape, t.alt)"
                        "  WHERE t.entry = entries.id AND b.tensor IS NULL)")  # fmt: skip
            sql += " ORDER BY name, version DESC"
            rows = con.execute(sql, args).fetchall()
            ids = [i for i, name in rows if name_glob is None or fnmatch.fnmatchcase(name, name_glob)]
            return self._entries(con, ids)

    def _entries(self, con: sqlite3.Connection, ids: list[int]) -> list[Entry]:
        """Entries without files and events (one query each for the rest, however many entries)."""
        if not ids:
            return []
        con.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (id INTEGER PRIMARY KEY)")
        con.execute("DELETE FROM wanted")
        con.executemany("INSERT INTO wanted VALUES (?)", [(i,) for i in ids])
        rows = {r[0]: r for r in con.execute(
            "SELECT id, name, version, digest, format, weights, created, description, base_model, operation,"
            " modules, ranks, parameters FROM entries JOIN wanted USING (id)")}  # fmt: skip
        out = {i: _entry_from_row(r) for i, r in rows.items()}
        for entry, alias in con.execute("SELECT entry, alias FROM aliases JOIN wanted ON wanted.id = entry"):
            out[entry].aliases.append(alias)
        for entry, key, value in con.execute("SELECT entry, key, value FROM tags JOIN wanted ON wanted.id = entry"):
            out[entry].tags[key] = value
        return [out[i] for i in ids]

    # -- changing ---------------------------------------------------------------------------
    def alias(self, ref: str, alias: str) -> Entry:
        """Point ``NAME@alias`` at the entry ``ref`` names (moving it if it pointed elsewhere)."""
        _check_alias(alias)
        with self._connect(write=True) as con, _transaction(con):
            entry = self._entry(con, self._resolve_id(con, ref))
            con.execute("INSERT OR REPLACE INTO aliases VALUES (?,?,?)", (entry.name, alias, entry.id))
            return self._entry(con, entry.id)

    def remove(self, ref: str) -> Entry:
        """Drop one entry (its aliases go with it); its blobs stay until :meth:`gc`."""
        with self._connect(write=True) as con, _transaction(con):
            entry = self._entry(con, self._resolve_id(con, ref))
            con.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
            return entry

    def fingerprint(self, entry: Entry) -> dict[str, Any]:
        """What the entry needs of a base: each target tensor's shape, and the base checkpoint's
        files by sha256 where provenance names them (an extracted adapter's ``base``)."""
        with self._connect() as con:
            targets = {t: [int(d) for d in shape.split(",") if d] for t, shape in con.execute(
                "SELECT tensor, shape FROM targets WHERE entry = ? ORDER BY tensor", (entry.id,))}  # fmt: skip
            base = [{"path": p, "sha256": sha} for sha, p in con.execute(
                "SELECT sha256, path FROM inputs WHERE entry = ? AND role = 'base'", (entry.id,))]  # fmt: skip
        return {"targets": targets, "base_files": base}

    def record_event(self, entry: Entry, kind: str, target: str, detail: str | None = None) -> None:
        with self._connect(write=True) as con, _transaction(con):
            con.execute("INSERT INTO events VALUES (?,?,?,?,?)", (entry.id, kind, target, detail, _now()))

    def gc(self) -> dict[str, int]:
        """Remove blobs no entry references, and views of removed entries. The write lock is held
        throughout, so an add running alongside finds its blobs (it re-stores any it misses)."""
        removed, freed, views = 0, 0, 0
        if not self.exists:
            return {"blobs_removed": 0, "bytes_freed": 0, "views_removed": 0}
        with self._connect(write=True) as con, _transaction(con):
            live = {r[0] for r in con.execute("SELECT DISTINCT blob FROM files")}
            digests = {r[0] for r in con.execute("SELECT digest FROM entries")}
            for blob in self.blobs.glob("*/*") if self.blobs.is_dir() else []:
                if blob.name not in live:
                    freed += blob.stat().st_size
                    blob.unlink()
                    removed += 1
            for view in self.views.iterdir() if self.views.is_dir() else []:
                if view.name not in digests:
                    shutil.rmtree(view, ignore_errors=True)
                    views += 1
        shutil.rmtree(self.home / "tmp", ignore_errors=True)
        return {"blobs_removed": removed, "bytes_freed": freed, "views_removed": views}

    def verify(self) -> list[dict[str, Any]]:
        """Re-hash every referenced blob; one record per blob that is missing or does not match
        (with the entries it belongs to). Nothing is deleted."""
        if not self.exists:
            return []
        with self._connect() as con:
            owners: dict[str, list[str]] = {}
            for blob, name, version, path in con.execute(
                "SELECT f.blob, e.name, e.version, f.path FROM files f JOIN entries e ON e.id = f.entry ORDER BY 1"
            ):
                owners.setdefault(blob, []).append(f"{name}@v{version}/{path}")
            entries = [self._entry(con, int(i)) for (i,) in con.execute("SELECT id FROM entries ORDER BY id")]
        bad = []
        for blob, where in owners.items():
            problem = self._blob_problem(blob)
            if problem is not None:
                bad.append({"blob": blob, "problem": problem, "entries": where})
        for entry in entries:  # what commands read: the views
            for path in self._view_problems(entry):
                where = [f"{entry.name}@v{entry.version}"]
                bad.append({"view": str(self.views / entry.digest / path), "entries": where,
                            "problem": "the view's file is not the registered blob (replaced or edited); the next "
                                       "read rebuilds it"})  # fmt: skip
        return bad

    def _blob_problem(self, blob: str) -> str | None:
        path = self._blob(blob)
        if not path.is_file():
            return "missing"
        if _sha256(path) != blob:
            return "changed: their content no longer matches its sha256"
        return None

    def _view_problems(self, entry: Entry) -> list[str]:
        """The files of ``entry``'s view (where it has one) that are not its blobs: a hard link to the
        blob, or (where hard links fail) a copy of the same bytes."""
        view = self.views / entry.digest
        if not view.is_dir():
            return []
        bad = []
        for path, blob, _ in entry.files:
            f = view / path
            try:
                same = os.path.samefile(f, self._blob(blob)) and not f.is_symlink()
            except OSError:
                same = False
            if not same and not (f.is_file() and not f.is_symlink() and _sha256(f) == blob):
                bad.append(path)
        return bad

    # -- using ------------------------------------------------------------------------------
    def materialize(self, entry: Entry) -> Path:
        """An adapter directory (or file, for a one-file adapter) holding the entry's files, made of
        hard links to the blobs; built once per entry, atomically. What it returns is the registered
        bytes: each blob is checked against its sha256, and a view whose files are not its blobs
        (replaced or edited) is built again from them.

        Raises:
            RegistryError: a blob is missing or no longer matches its sha256 (nothing is read).
        """
        for path, blob, _ in entry.files:
            problem = self._blob_problem(blob)
            if problem is not None:
                raise RegistryError(
                    f"{entry.name}@v{entry.version}: the registered bytes of '{path}' are {problem}; nothing was "
                    "read", path=str(self._blob(blob)),
                    fix="add the adapter again from its source (loratool registry add), or remove this version; "
                    "loratool registry verify lists every damaged blob",
                )  # fmt: skip
        view = self.views / entry.digest
        if view.is_dir() and self._view_problems(entry):
            shutil.rmtree(view, ignore_errors=True)  # rebuilt below from the checked blobs
        if not view.is_dir():
            tmp = self.views / f".{entry.digest}.{uuid.uuid4().hex}.tmp"
            _private_dir(self.views)
            tmp.mkdir(mode=0o700)
            try:
                for path, blob, _ in entry.files:
                    try:
                        os.link(self._blob(blob), tmp / path)
                    except OSError:  # no hard links here (another file system, FAT, ...)
                        shutil.copyfile(self._blob(blob), tmp / path)
                        os.chmod(tmp / path, 0o400)
                try:
                    os.rename(tmp, view)
                except OSError:  # another process built it first
                    shutil.rmtree(tmp, ignore_errors=True)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return view if entry.format not in ("kohya", "diffusers") else view / entry.weights

    def entry_of_view(self, path: str | os.PathLike[str]) -> Entry | None:
        """The entry whose view ``path`` is (or lies in), if any."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(self.views))
        except ValueError:
            return None
        if not rel.parts or not self.exists:
            return None
        with self._connect() as con:
            row = con.execute("SELECT id FROM entries WHERE digest = ?", (rel.parts[0],)).fetchone()
            return None if row is None else self._entry(con, int(row[0]))

    def lineage(self, entry: Entry, *, depth: int = 8) -> dict[str, Any]:
        """Where ``entry`` came from (parents, by provenance input digests, recursively) and what
        came from it (entries whose inputs include its files; checkpoints it was merged into)."""
        with self._connect() as con:
            return {
                "ref": entry.ref,
                "parents": self._parents(con, entry.id, depth, {entry.id}),
                "children": self._children(con, entry.id, depth, {entry.id}),
            }

    def _parents(self, con: sqlite3.Connection, entry_id: int, depth: int, seen: set[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        listed: set[int] = set()
        for sha, path, role in con.execute("SELECT sha256, path, role FROM inputs WHERE entry = ?", (entry_id,)):
            owners = sorted({r[0] for r in con.execute("SELECT entry FROM files WHERE blob = ?", (sha,))} - seen)
            if not owners or depth <= 0:
                out.append({"path": path, "role": role, "sha256": sha})
            for owner in owners:  # an adapter is several input files: list it once
                if owner not in listed:
                    listed.add(owner)
                    e = self._entry(con, owner)
                    out.append({"ref": e.ref, "role": role, "sha256": sha, "operation": e.operation,
                                "parents": self._parents(con, owner, depth - 1, seen | {owner})})  # fmt: skip
        for target, detail in con.execute(
            "SELECT target, detail FROM events WHERE entry = ? AND kind = 'pulled'", (entry_id,)
        ):
            out.append({"hub": target, "commit": detail, "role": "pulled from"})
        return out

    def _children(self, con: sqlite3.Connection, entry_id: int, depth: int, seen: set[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        blobs = [r[0] for r in con.execute("SELECT blob FROM files WHERE entry = ?", (entry_id,))]
        users = sorted({r[0] for b in blobs for r in con.execute("SELECT entry FROM inputs WHERE sha256 = ?", (b,))})
        for user in users:
            if user in seen or depth <= 0:
                continue
            e = self._entry(con, user)
            out.append({"ref": e.ref, "operation": e.operation,
                        "children": self._children(con, user, depth - 1, seen | {user})})  # fmt: skip
        for kind, target, detail, _ in con.execute(
            "SELECT kind, target, detail, at FROM events WHERE entry = ? AND kind != 'pulled'", (entry_id,)
        ):
            out.append({"event": kind, "target": target, "detail": detail})
        return out


def _entry_from_row(r: Sequence[Any]) -> Entry:
    return Entry(
        id=r[0], name=r[1], version=r[2], digest=r[3], format=r[4], weights=r[5], created=r[6], description=r[7],
        base_model=r[8], operation=r[9], modules=r[10], ranks=json.loads(r[11]), parameters=r[12],
    )  # fmt: skip


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: writers queue for the lock; an error rolls back."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _journal_in_wal(con: sqlite3.Connection) -> None:
    """``PRAGMA journal_mode=WAL``, waiting as long as any other write would. On a database that is
    not in WAL mode yet (a new registry) the change takes a read lock and then the write lock, and
    where another connection is making the same change SQLite answers "database is locked" at once
    rather than call the busy handler (which could deadlock there): processes opening a new registry
    together failed so (4 of 360 in an ad hoc run of 12 at a time; none with this loop)."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


_BUSY_SECONDS = 60.0  # how long a command waits for another process's write to the catalog


def _index_fix(e: sqlite3.DatabaseError) -> str:
    """What to do about an index that cannot be used, by why: moving registry.db aside discards the
    catalog, so it is the advice only for a damaged one."""
    text = str(e).lower()
    if "locked" in text or "busy" in text:
        return (f"another process holds the registry ({_BUSY_SECONDS:g} s waited): let it finish, or find it with "
                "fuser on registry.db; leave registry.db where it is")  # fmt: skip
    if "full" in text or "disk i/o" in text:
        return "free space on the registry's disk (LORATOOL_HOME), then run the command again"
    if "readonly" in text or "read-only" in text:
        return "make LORATOOL_HOME writable for you, or set it to a folder you can write"
    return ("registry.db is damaged: keep a copy, then move it aside to start a new catalog (the files under blobs/ "
            "stay; loratool registry verify checks them, and registry add registers them again)")  # fmt: skip


def check_name(name: str) -> None:
    """Refuse what cannot be a registry name: other characters, an empty, ``.`` or ``..`` part
    between slashes (``a/../b``, ``x/``), or a part that reads as a version (``v1``)."""
    parts = name.split("/")
    bad_part = any(p in ("", ".", "..") or _VERSION.fullmatch(p) for p in parts)
    if not _NAME.fullmatch(name) or "@" in name or name.startswith("sha256:") or bad_part:
        raise RegistryError(
            f"{name!r} is not a registry name",
            fix="use letters, digits and . _ - + / (starting with a letter or digit; no empty, '.' or '..' part "
            "between slashes, and no part like v1, which reads as a version)",
        )


def _check_alias(alias: str) -> None:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", alias) or _VERSION.fullmatch(alias):
        raise RegistryError(
            f"{alias!r} is not an alias", fix="start with a letter; v1, v2, ... are versions, not aliases"
        )


def _manifest_digest(stored: list[tuple[str, str, int]]) -> str:
    return hashlib.sha256("".join(f"{p}\0{b}\n" for p, b, _ in sorted(stored)).encode()).hexdigest()


def _path_of(stored: list[tuple[str, str, int]], blob: str) -> str:
    return next(p for p, b, _ in stored if b == blob)


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(int(d)) for d in shape)


def _inputs(record: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(sha256, path, role) of each provenance input; the role is the parameter that named it."""
    params = record.get("parameters") or {}
    roles = {str(v): k for k, v in params.items() if isinstance(v, str)}
    out = []
    for item in record.get("inputs") or []:
        if not isinstance(item, dict) or not isinstance(item.get("sha256"), str):
            continue
        path = str(item.get("path", ""))
        role = next((r for p, r in roles.items() if p and (path == p or path.startswith(p.rstrip("/") + "/"))), "input")
        out.append((item["sha256"], path, role))
    return out


def _sweep_parts(tmp_dir: Path) -> None:
    """Remove the partial blobs of ``registry add`` runs (on this host) that died while copying, as
    outputs' temporaries are removed; a live writer's are left alone."""
    for part in tmp_dir.glob("*.part"):
        fields = part.name.rsplit("-", 2)  # HOST-PID-UUID.part (a host name has no '-': see io.atomic.HOST)
        if len(fields) == 3 and fields[1].isdigit() and writer_gone(fields[0], int(fields[1])):
            part.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def resolve_path(arg: str, *, home: str | os.PathLike[str] | None = None) -> str:
    """The path a command should read for ``arg``: ``arg`` itself when it exists (a path always
    wins), else the registry view of the entry it names. A bare name the registry does not know is
    returned as given, so the command reports the missing path as it always has; a malformed or
    unknown ``NAME@...`` or ``sha256:...`` is an error that says so."""
    if os.path.exists(arg) or not looks_like_ref(arg):
        return arg
    registry = Registry(home)
    if not registry.exists:
        if arg.startswith("sha256:") or "@" in arg:
            raise RegistryError(f"no such path, and the registry is empty: {arg}", path=str(registry.home))
        return arg
    try:
        entry = registry.resolve(arg)
    except RegistryError:
        if arg.startswith("sha256:") or "@" in arg:
            raise
        return arg
    return str(registry.materialize(entry))
