"""``loratool convert``: an adapter between formats (PEFT, kohya, mlx-lm, GGUF, LyCORIS in)."""

from __future__ import annotations

from typing import Any

import click

from .app import cli
from .params import (
    ADAPTER_PATH,
    DTYPE,
    FORCE,
    JSON,
    OUTPUT,
    PICKLE,
    PORTABLE,
    QUIET,
    REGISTER,
    emit,
    options,
    registered,
)


class _Fusion(click.ParamType):  # type: ignore[type-arg]
    """FUSED=PART,PART,...: a fused module's leaf name and its parts' leaf names, in row order."""

    name = "FUSED=PARTS"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, tuple[str, ...]]:
        if isinstance(value, tuple):
            return value
        fused, _, parts = str(value).partition("=")
        names = tuple(p.strip() for p in parts.split(",") if p.strip())
        if not fused.strip() or len(names) < 2 or len(set(names)) < len(names):
            self.fail(f"{value!r}: give FUSED=PART,PART,... with two or more distinct parts", param, ctx)
        return fused.strip(), names


_FUSION = _Fusion()


@cli.command()
@click.argument("adapter", type=ADAPTER_PATH)
@click.option(
    "--to",
    "to",
    type=click.Choice(["peft", "kohya", "mlx", "gguf", "diffusers"]),
    required=True,
    help="The format to write (diffusers: the pipeline LoRA file diffusers' load_lora_weights reads).",
)
@PORTABLE
@click.option(
    "--base",
    type=click.Path(),
    default=None,
    help="The base checkpoint (headers and config.json only). GGUF: required (llama.cpp's architecture, tensor "
    "names; every module must fit). kohya and GGUF input: names its modules.",
)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default="f32",
    show_default=True,
    help="GGUF tensor type (q8_0 falls back to f16 for rows that do not divide into blocks of 32, as llama.cpp does).",
)
@click.option(
    "--fuse",
    "fuse",
    type=_FUSION,
    multiple=True,
    help="FUSED=PART,PART,... e.g. qkv_proj=q_proj,k_proj,v_proj: each layer's parts become one module "
    "(A stacked, B block-diagonal), for fused checkpoints such as Phi-3. Repeatable.",
)
@click.option(
    "--split",
    "split",
    type=_FUSION,
    multiple=True,
    help="FUSED=PART,PART,... the other way: each part gets the shared A and its rows of B (sizes from --base).",
)
@click.option(
    "-r",
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="LyCORIS LoHa/LoKr input (required there): the LoRA rank each module's delta is truncated to by SVD; "
    "the output reports each module's relative error.",
)
@options(OUTPUT, REGISTER, DTYPE, FORCE, PICKLE, QUIET, JSON)
def convert(adapter: str, to: str, portable: bool, base: str | None, outtype: str, fuse: tuple[Any, ...],
            split: tuple[Any, ...], rank: int | None, output: str, register: str | None, dtype: str | None,
            force: bool, allow_pickle: bool, quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Write ADAPTER in another format (PEFT, kohya, mlx-lm, llama.cpp GGUF); every delta stays the same.

    Reads PEFT directories, kohya .safetensors files, mlx-lm adapter directories, llama.cpp
    LoRA adapters (.gguf, with --base: llama.cpp's names lead back to module paths only through
    the base) and LyCORIS LoHa/LoKr files (with -r: each module's delta truncated by SVD, its
    error reported). GGUF needs the gguf package: pip install 'loratool[gguf]'.

    \b
    Examples:
      loratool convert adapter/ --to mlx -o adapter-mlx/
      loratool convert adapter-mlx/ --to peft -o adapter/
      loratool convert adapter/ --to peft --portable -o adapter-vllm/
      loratool convert adapter/ --to gguf --base model/ -o adapter.gguf
      loratool convert adapter/ --to peft --fuse qkv_proj=q_proj,k_proj,v_proj \\
          --fuse gate_up_proj=gate_proj,up_proj -o adapter-phi3/
      loratool convert lora.safetensors --to peft --base model/ -o adapter/
      loratool convert adapter.gguf --to peft --base model/ -o adapter/
      loratool convert loha.safetensors --to peft -r 16 --base model/ -o adapter/
    """  # noqa: D301
    from ..ops.convert import convert as run

    result = run(adapter, to=to, output=output, portable=portable, base=base, dtype=dtype,  # type: ignore[arg-type]
                 outtype=outtype, fuse=fuse, split=split, rank=rank, force=force,  # type: ignore[arg-type]
                 allow_pickle=allow_pickle)  # fmt: skip

    def text(d: dict[str, Any]) -> str:
        ranks = ", ".join(map(str, d["ranks"]))
        arch = f", {d['gguf']['arch']}, {d['gguf']['outtype']}, alpha {d['gguf']['alpha']:g}" if d.get("gguf") else ""
        line = (f"wrote {d['output']} ({d['format']}{arch}, from {d['source_format']}): {d['modules']} modules, "
                f"rank {ranks}, {d['parameters']:,} parameters")  # fmt: skip
        errors = d.get("truncation")
        if errors:
            worst = max(errors, key=errors.get)
            line += (f"\n{len(errors)} LoHa/LoKr module(s) truncated: relative error mean "
                     f"{sum(errors.values()) / len(errors):.2e}, worst {errors[worst]:.2e} ({worst})")  # fmt: skip
        return line

    if register and to == "gguf":
        raise click.UsageError("--register keeps PEFT, kohya and mlx adapters; a GGUF file is for llama.cpp")
    emit(registered(result, register), as_json, text)
