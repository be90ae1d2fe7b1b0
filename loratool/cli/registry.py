"""``loratool registry ...``: the local catalog of adapter versions."""

from __future__ import annotations

from typing import Any

import click

from .app import Group, cli
from .params import ENDPOINT, JSON, emit, options


class _Tag(click.ParamType):  # type: ignore[type-arg]
    """KEY=VALUE."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, val = str(value).partition("=")
        if not sep or not key.strip():
            self.fail(f"{value!r}: give KEY=VALUE", param, ctx)
        return key.strip(), val


@cli.group(cls=Group)
def registry() -> None:
    """A local catalog of adapters: versions, aliases, lineage, compatibility.

    Entries live under LORATOOL_HOME (default ~/.cache/loratool). Wherever a command takes an
    adapter path it also takes a reference: NAME (newest version), NAME@v3, NAME@prod (an alias)
    or sha256:PREFIX. A path that exists always wins over a reference of the same spelling.

    \b
    Examples:
      loratool registry add adapter/ --name support-bot --alias staging --tag task=support
      loratool registry ls --base model/
      loratool registry alias support-bot@v2 prod
      loratool merge model/ support-bot@prod -o merged/
      loratool registry show support-bot@prod --lineage
    """  # noqa: D301


@registry.command("add")
@click.argument("adapter", type=click.Path())
@click.option("--name", required=True, help="The name; the entry becomes its next version (v1, v2, ...).")
@click.option("--alias", "aliases", multiple=True, help="An alias to point at this version (repeatable).")
@click.option("--tag", "tags", multiple=True, type=_Tag(), help="KEY=VALUE (repeatable).")
@click.option("--description", default=None, help="Free text.")
@options(JSON)
def registry_add(adapter: str, name: str, aliases: tuple[str, ...], tags: tuple[tuple[str, str], ...],
                 description: str | None, as_json: bool) -> None:  # fmt: skip
    """Validate ADAPTER and register it as the next version of --name (files are copied in).

    \b
    Examples:
      loratool registry add adapter/ --name support-bot
      loratool registry add adapter/ --name support-bot --alias staging --tag task=support
    """
    from ..registry.ops import register

    result = register(adapter, name=name, aliases=aliases, tags=dict(tags), description=description)

    def text(d: dict[str, Any]) -> str:
        what = "registered" if d["created"] else "already registered"
        aliases = f" ({', '.join(d['aliases'])})" if d["aliases"] else ""
        return f"{what} {d['ref']}{aliases}: {d['modules']} modules, {d['digest'][:19]}"

    emit(result, as_json, text)


@registry.command("ls")
@click.option("--name", "name_glob", default=None, help="Only names matching this glob (e.g. 'support-*').")
@click.option("--base", type=click.Path(), default=None,
              help="Only adapters whose every module fits this checkpoint (headers only).")  # fmt: skip
@click.option("--hub", "hub_owner", default=None, help="List the Hub's PEFT adapters of this user or org instead.")
@click.option("--hub-base", "hub_base", default=None, help="List the Hub's PEFT adapters for this base model id.")
@options(ENDPOINT, JSON)
def registry_ls(name_glob: str | None, base: str | None, hub_owner: str | None, hub_base: str | None,
                endpoint: str | None, as_json: bool) -> None:  # fmt: skip
    """List registered adapters, newest version first per name (or adapters on the Hub).

    \b
    Examples:
      loratool registry ls --name 'support-*'
      loratool registry ls --base model/          # only those that fit it (headers only)
      loratool registry ls --hub-base meta-llama/Llama-3.2-1B --json
    """
    if hub_owner or hub_base:
        from ..ops.hub import list_hub_adapters

        models = list_hub_adapters(owner=hub_owner, base_model=hub_base, endpoint=endpoint)
        emit({"hub": models}, as_json, lambda d: "\n".join(m["id"] for m in d["hub"]) or "no adapters found")
        return
    from ..registry.ops import list_entries

    entries = list_entries(name_glob=name_glob, base=base)

    def text(d: dict[str, Any]) -> str:
        if not d["entries"]:
            return "no adapters" + (" fit that base" if base else " registered")
        rows = [f"{'REF':<32} {'ALIASES':<16} {'FORMAT':<6} {'MODULES':>7} {'RANKS':<10} DIGEST"]
        for e in d["entries"]:
            ranks = ",".join(map(str, e["ranks"]))
            rows.append(f"{e['ref']:<32} {','.join(e['aliases']):<16} {e['format']:<6} {e['modules']:>7} "
                        f"{ranks:<10} {e['digest'][7:19]}")  # fmt: skip
        return "\n".join(rows)

    emit({"entries": [e.to_json() for e in entries]}, as_json, text)


@registry.command("show")
@click.argument("ref")
@click.option("--lineage", is_flag=True, help="Also where it came from and what came from it.")
@options(JSON)
def registry_show(ref: str, lineage: bool, as_json: bool) -> None:
    """Show one entry: files, digests, aliases, tags, provenance, Hub events.

    \b
    Examples:
      loratool registry show support-bot@prod
      loratool registry show support-bot@v2 --lineage --json
    """
    from ..registry.ops import lineage_lines
    from ..registry.store import Registry

    reg = Registry()
    entry = reg.resolve(ref)
    payload = {**entry.to_json(), "base_fingerprint": reg.fingerprint(entry)}
    if lineage:
        payload["lineage"] = reg.lineage(entry)

    def text(d: dict[str, Any]) -> str:
        ranks = ",".join(map(str, d["ranks"]))
        lines = [
            f"{d['ref']}  {d['digest']}",
            f"  created {d['created']}",
            f"  format {d['format']}, {d['modules']} modules, ranks {ranks}, {d['parameters']:,} parameters",
        ]
        if d["operation"]:
            lines.append(f"  made by loratool {d['operation']}")
        for key in ("aliases", "tags"):
            if d[key]:
                lines.append(f"  {key}: " + (", ".join(d[key]) if key == "aliases" else
                                            ", ".join(f"{k}={v}" for k, v in d[key].items())))  # fmt: skip
        if d["description"]:
            lines.append(f"  {d['description']}")
        lines += [f"  file {f['path']} ({f['size']:,} bytes) sha256:{f['sha256'][:16]}" for f in d["files"]]
        fp = d["base_fingerprint"]
        lines.append(f"  fits a base with {len(fp['targets'])} tensor(s) of these shapes (show --json lists them)")
        lines += [f"  base file {b['path']} sha256:{b['sha256'][:16]}" for b in fp["base_files"]]
        lines += [f"  {e['kind']} {e['target']} {e['detail']}".rstrip() for e in d["events"]]
        if "lineage" in d:
            lines += ["lineage:"] + ["  " + line for line in lineage_lines(d["lineage"])]
        return "\n".join(lines)

    emit(payload, as_json, text)


@registry.command("alias")
@click.argument("ref")
@click.argument("alias")
@options(JSON)
def registry_alias(ref: str, alias: str, as_json: bool) -> None:
    """Point NAME@ALIAS at the version REF names (moving it if it pointed elsewhere).

    \b
    Example:
      loratool registry alias support-bot@v2 prod
    """
    from ..registry.store import Registry

    entry = Registry().alias(ref, alias)
    emit(entry.to_json(), as_json, lambda d: f"{d['name']}@{alias} -> {d['ref']}")


@registry.command("rm")
@click.argument("ref")
@options(JSON)
def registry_rm(ref: str, as_json: bool) -> None:
    """Remove the version REF names (its aliases go with it; `registry gc` frees the files).

    \b
    Example:
      loratool registry rm support-bot@v1 && loratool registry gc
    """
    from ..registry.store import Registry

    entry = Registry().remove(ref)
    emit(entry.to_json(), as_json, lambda d: f"removed {d['ref']}")


@registry.command("gc")
@options(JSON)
def registry_gc(as_json: bool) -> None:
    """Delete stored files that no entry references any more.

    \b
    Example:
      loratool registry gc --json
    """
    from ..registry.store import Registry

    result = Registry().gc()
    emit(result, as_json, lambda d: f"removed {d['blobs_removed']} file(s), {d['bytes_freed']:,} bytes")


@registry.command("verify")
@options(JSON)
def registry_verify(as_json: bool) -> None:
    """Re-hash every stored file and check every view (what commands read) holds them; report (never
    delete) what is missing or does not match. Exit 1 if any.

    \b
    Example:
      loratool registry verify || echo "the store needs attention"
    """
    from ..registry.store import Registry

    bad = Registry().verify()

    def text(d: dict[str, Any]) -> str:
        if not d["problems"]:
            return "every stored file matches its sha256, and every view holds them"
        return "\n".join(f"{p['blob'][:16] if 'blob' in p else p['view']}: {p['problem']} ({', '.join(p['entries'])})"
                         for p in d["problems"])  # fmt: skip

    emit({"problems": bad}, as_json, text, failed=bool(bad))
