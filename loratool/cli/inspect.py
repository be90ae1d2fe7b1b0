"""``loratool inspect`` and ``loratool validate``: what an adapter holds, and whether it is right."""

from __future__ import annotations

from typing import Any

import click

from .app import cli
from .params import ADAPTER_PATH, JSON, PICKLE, emit, options


@cli.command()
@click.argument("path", type=ADAPTER_PATH)
@options(PICKLE, JSON)
def inspect(path: str, allow_pickle: bool, as_json: bool) -> None:
    """Show what a checkpoint or an adapter holds (checkpoints: from headers only).

    \b
    Examples:
      loratool inspect model/
      loratool inspect adapter/ --json
    """
    from ..ops.inspect import inspect as run

    emit(run(path, allow_pickle=allow_pickle), as_json, _inspect_text)


def _inspect_text(d: dict[str, Any]) -> str:
    if d["kind"] == "checkpoint":
        shards = ", ".join(f"{s['file']} ({s['tensors']})" for s in d["shards"])
        lines = [
            f"checkpoint {d['path']}",
            f"  tensors {d['tensors']:,}   parameters {d['parameters']:,}   bytes {d['bytes']:,}",
            f"  dtypes {d['dtypes']}   model_type {d['model_type']}",
            *_quantization_lines(d.get("quantization")),
            f"  files {shards}" + (f"   index {d['index']}" if d["index"] else ""),
        ]
    else:
        lines = [
            f"adapter {d['path']} ({d['format']})",
            f"  modules {d['module_count']}   ranks {d['ranks']}   trainable parameters {d['trainable_parameters']:,}",
            f"  dtypes {d['dtypes']}   rslora {d['use_rslora']}   dora {d['use_dora']}   bytes {d['bytes']:,}",
            f"  base model {d['base_model_name_or_path']}",
        ]
        for m in d["modules"]:
            lines.append(
                f"  {m['module']:<48} {m['kind']:<9} r={m['rank']:<4} alpha={m['alpha']:<6g} scaling={m['scaling']:.4g}"
            )
        if d["whole_tensors"]:
            lines.append(f"  whole tensors: {', '.join(d['whole_tensors'])}")
        if d.get("trainable_tokens"):
            rows = ", ".join(f"{k} ({n} rows)" for k, n in d["trainable_tokens"].items())
            lines.append(f"  trainable tokens (rows replaced on merge): {rows}")
    if d.get("provenance"):
        p = d["provenance"]
        lines.append(f"  made by loratool {p.get('version')} {p.get('operation')} at {p.get('created')}")
    return "\n".join(lines)


def _quantization_lines(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    if not q["supported"]:
        return [f"  quantized: {q['method']} ({q['evidence']}): {q.get('why_unsupported', 'not supported')}"]
    if "packed_weights" in q:  # MXFP4, NVFP4, INT4/INT8: a line per weight
        head = f"  quantized: {q['method']} ({', '.join(q['schemes'])}), {len(q['quantized_weights'])} packed weights"
        return [head, *(f"    {w['tensor']} {w['shape']}: {w['scheme']}" for w in q["packed_weights"])]
    block = f"block {q['block'][0]}x{q['block'][1]}" if q.get("block") else "block"
    schemes = ", ".join(block if s == "block" else f"per {s}" for s in q["schemes"])
    return [f"  quantized: {q['method']} ({schemes}), {len(q['quantized_weights'])} FP8 weights"]


@cli.command()
@click.argument("adapter", type=ADAPTER_PATH)
@click.option("--no-values", is_flag=True, help="Skip reading tensors (finite values, recorded digest).")
@click.option(
    "--base",
    type=click.Path(),
    default=None,
    help="Also check that every module fits this checkpoint (names and shapes, headers only).",
)
@click.option(
    "--runtime",
    "runtimes",
    type=click.Choice(["vllm", "llama.cpp", "mlx", "peft"]),
    multiple=True,
    help="Also check what this runtime can serve (repeatable); each problem says how to fix it. "
    "llama.cpp needs --base.",
)
@options(JSON)
def validate(adapter: str, no_values: bool, base: str | None, runtimes: tuple[str, ...], as_json: bool) -> None:
    """Check ADAPTER's metadata against schemas/ and its structure against its tensors.

    Lists every problem at once with its path; exits 0 when valid, 1 when not.

    \b
    Examples:
      loratool validate adapter/
      loratool validate adapter/ --json
      loratool validate adapter/ --base model/   # does it fit this model?
      loratool validate adapter/ --runtime vllm --runtime llama.cpp --base model/
    """
    from ..ops.validate import validate as run

    report = run(adapter, check_values=not no_values, base=base, runtimes=runtimes)  # type: ignore[arg-type]
    emit(report, as_json, _validate_text, failed=not report.valid)


def _validate_text(d: dict[str, Any]) -> str:
    if d["valid"]:
        checked = ", tensor digest checked" if d["sha256_checked"] else ""
        return f"valid: {d['path']} ({d['format']}, {d['modules']} modules{checked})"
    lines = [f"invalid: {d['path']} ({len(d['problems'])} problem(s))"]
    lines += [f"  {p['path']}: {p['message']}" for p in d["problems"]]
    return "\n".join(lines)
