"""``loratool convert``: one adapter, another file format (PEFT, kohya, mlx-lm, llama.cpp GGUF), the same deltas."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..adapter import Adapter
from ..errors import InputFileError, LoraToolError, MissingKeyError, ShapeMismatchError
from ..formats import check_output_name, diffusers, load_adapter, require_finite, save_adapter
from ..formats.kohya import resolve_paths
from ..formats.lycoris import is_lycoris_file, read_lycoris
from ..io.atomic import check_output
from ..io.checkpoint import open_checkpoint, torch_dtype
from ..io.logical import live_keys
from ..metadata.provenance import PROVENANCE_KEY, InputHasher, encode, make_record
from ..runtimes import mlx, transforms
from ..runtimes.gguf import OutType, read_gguf, refuse_for_gguf, write_gguf
from ..validation import ValidationReport, check_fit, require_valid

Target = Literal["peft", "kohya", "mlx", "gguf", "diffusers"]
Fusion = tuple[str, Sequence[str]]  # (fused module leaf, its parts' leaves in row order)
TARGETS: tuple[Target, ...] = ("peft", "kohya", "mlx", "gguf", "diffusers")


@dataclass
class ConvertResult:
    """What :func:`convert` wrote."""

    output: Path
    source_format: str
    format: str
    modules: int
    ranks: list[int]
    parameters: int
    parameters_before: int
    portable: bool
    warnings: list[str] = field(default_factory=list)
    gguf: dict[str, Any] | None = None  # arch, alpha, outtype, folded: GGUF output only
    truncation: dict[str, float] | None = None  # LyCORIS input: module -> ||delta - B A|| / ||delta||

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "source_format": self.source_format, "format": self.format,
            "modules": self.modules, "ranks": self.ranks, "parameters": self.parameters,
            "parameters_before": self.parameters_before, "portable": self.portable, "warnings": self.warnings,
            **({"gguf": self.gguf} if self.gguf is not None else {}),
            **({"truncation": self.truncation} if self.truncation is not None else {}),
        }  # fmt: skip


def convert(
    adapter: str | os.PathLike[str],
    *,
    to: Target,
    output: str | os.PathLike[str],
    portable: bool = False,
    base: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    outtype: OutType = "f32",
    fuse: Sequence[Fusion] = (),
    split: Sequence[Fusion] = (),
    rank: int | None = None,
    force: bool = False,
    allow_pickle: bool = False,
) -> ConvertResult:
    """Write ``adapter`` in another format; every module's delta stays what it was (LyCORIS LoHa and
    LoKr: its best rank-``rank`` approximation, the error reported per module).

    Args:
        adapter: a PEFT directory, a kohya ``.safetensors`` file, an mlx-lm directory, a llama.cpp
            LoRA ``.gguf`` (needs ``base``: its tensor names lead back to module paths) or a LyCORIS
            LoHa/LoKr ``.safetensors`` (needs ``rank``).
        to: ``peft``, ``kohya``, ``mlx``, ``gguf`` (llama.cpp; needs ``base`` and the ``gguf`` package) or
            ``diffusers`` (a pipeline LoRA file; ``base`` is the component's folder, ``PIPE/unet``, which also
            picks the component out of a diffusers file written to another format).
        output: the directory (PEFT, mlx) or file (kohya ``.safetensors``, ``.gguf``) to write.
        portable: (PEFT) every module at one rank with scaling 1 (``lora_alpha = r``, no
            ``rank_pattern``/``alpha_pattern``), so runtimes that read only ``r`` and
            ``lora_alpha`` (vLLM) scale every module right. Lower ranks are padded with zeros.
        base: a checkpoint whose module paths name a kohya or LyCORIS file's modules, each of which
            must fit its weight (headers only); for GGUF
            (required, output or input) the base the adapter is for: its config.json names
            llama.cpp's architecture and tensors, and every module must fit one of its weights.
        dtype: the factors' dtype (default: keep).
        outtype: GGUF tensor type: ``f32`` (exact), ``f16``, ``bf16`` or ``q8_0``.
        fuse: ``(fused, parts)`` pairs, e.g. ``("qkv_proj", ("q_proj", "k_proj", "v_proj"))``: the
            parts of each layer become one module, A stacked along the rank and B block-diagonal
            (as PEFT fuses), for fused checkpoints such as Phi-3's. Exact.
        split: the other way (needs ``base``, whose split weights give each part's size): each
            part gets the shared A and its rows of B. Exact.
        rank: (LyCORIS LoHa/LoKr input only, and required there) the LoRA rank each module's delta
            is truncated to by SVD; modules the file stores as LoRA are kept as they are.
        force: replace an existing output.

    Raises:
        LoraToolError: the target cannot hold the adapter (e.g. whole tensors in kohya, mlx or
            GGUF; DoRA or an unsupported architecture in GGUF), kohya names that no checkpoint
            resolves, an adapter that does not fit ``base``, an invalid adapter.

    Example:
        >>> loratool.convert("adapter/", to="mlx", output="adapter-mlx/")
    """
    from_gguf = Path(adapter).suffix == ".gguf"
    from_lycoris = not from_gguf and is_lycoris_file(adapter)
    _check_arguments(to, portable=portable, base=base, dtype=dtype, outtype=outtype, split=split, from_gguf=from_gguf,
                     fuse=fuse)  # fmt: skip
    _check_rank(rank, from_lycoris, adapter)
    check_output_name(output, to)
    out = check_output(output, force=force, inputs=[p for p in (adapter, base) if p is not None])
    truncation = None
    if from_gguf:
        assert base is not None
        a, warnings = _from_gguf(Path(adapter), base, allow_pickle)
    elif from_lycoris:
        assert rank is not None
        lycoris = read_lycoris(adapter, rank=rank)
        a, warnings, truncation = lycoris.adapter, [], lycoris.errors
        require_finite(a)
    else:
        warnings = require_valid(adapter, "convert refuses it", allow_pickle=allow_pickle)
        a = load_adapter(adapter, allow_pickle=allow_pickle)
    before = a.num_params
    source = "gguf" if from_gguf else "lycoris" if from_lycoris else a.format
    if base is not None and a.format == "kohya":
        _name_from(a, base, allow_pickle)
        _require_fit(a, base, allow_pickle)
    elif to != "kohya" and a.format == "kohya":
        _require_paths(a)
    a = _components(a, to, base, allow_pickle, warnings)
    for fused, parts in fuse:
        a = transforms.fuse(a, fused, parts)
    for fused, parts in split:
        assert base is not None
        a = transforms.split(a, fused, parts, _part_sizes(base, parts, allow_pickle))
    if (fuse or split) and base is not None and to != "gguf":
        _require_fit(a, base, allow_pickle)
    if a.format == "mlx" and to != "mlx":
        a = _from_mlx_tied(a, base, allow_pickle, warnings)
    if portable:
        a = transforms.portable_form(a, warnings)
    hasher = InputHasher(_files(Path(adapter)))
    params: dict[str, Any] = {"to": to, "portable": portable, "base": str(base) if base else None, "dtype": dtype}
    if rank is not None:
        params["rank"] = rank
    if fuse or split:
        params.update(fuse=[f"{f}={','.join(p)}" for f, p in fuse], split=[f"{f}={','.join(p)}" for f, p in split])
    if to == "gguf":
        params["outtype"] = outtype
    a.metadata = encode(make_record("convert", params, hasher.result()))
    if to == "gguf":
        assert base is not None
        result = _to_gguf(a, out, Path(base), outtype=outtype, force=force, source=source, before=before,
                          warnings=warnings, allow_pickle=allow_pickle)  # fmt: skip
        result.truncation = truncation
        return result
    if to == "mlx":
        a = _tied_for_mlx(a, base, allow_pickle, warnings)
    if to == "mlx" and base is not None and a.whole:
        _drop_unchanged(a, base, warnings)  # as the GGUF writer does: mlx-lm takes no whole tensors either
    save_adapter(a, out, format=to, force=force, dtype=torch_dtype(dtype) if dtype else None)
    written = load_adapter(out)
    if to == "mlx" and written.num_params > before:
        warnings.append(f"mlx-lm has one rank: ranks padded with zeros ({written.num_params - before} more parameters)")
    return ConvertResult(
        output=out, source_format=source, format=to, modules=len(written.modules),
        ranks=sorted({m.rank for m in written.modules.values()}), parameters=written.num_params,
        parameters_before=before, portable=portable, warnings=warnings, truncation=truncation,
    )  # fmt: skip


def _check_rank(rank: int | None, from_lycoris: bool, adapter: str | os.PathLike[str]) -> None:
    if from_lycoris and rank is None:
        raise LoraToolError(
            "a LyCORIS LoHa/LoKr adapter is not a low-rank product: it becomes LoRA by a truncated SVD of each "
            "module's delta, at a rank you choose", path=str(adapter),
            fix="give the rank with -r (e.g. -r 16); the output reports each module's error",
        )  # fmt: skip
    if rank is not None and not from_lycoris:
        raise LoraToolError(
            "-r is for LyCORIS LoHa/LoKr input (a LoRA keeps its factors through convert)", path=str(adapter),
            fix="re-rank a LoRA with loratool resize",
        )  # fmt: skip
    if rank is not None and rank < 1:
        raise LoraToolError(f"-r must be a positive rank, not {rank}", fix="e.g. -r 16")


def _to_gguf(
    a: Adapter, out: Path, base: Path, *, outtype: OutType, force: bool, source: str, before: int,
    warnings: list[str], allow_pickle: bool,
) -> ConvertResult:  # fmt: skip
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        config = ck.config()
    _drop_unchanged(a, base, warnings)
    refuse_for_gguf(a, config)  # what llama.cpp cannot take, said before any shape is compared
    _require_fit(a, base, allow_pickle)
    provenance = a.metadata.get(PROVENANCE_KEY)
    written = write_gguf(a, out, config=config, outtype=outtype, force=force, name=Path(a.path or "adapter").stem,
                         provenance=provenance)  # fmt: skip
    if written.folded:
        warnings.append(
            f"one adapter.lora.alpha ({written.alpha:g}) for every tensor: the scaling of {len(written.folded)} "
            "module(s) is folded into lora_b so llama.cpp's alpha / r gives each its own"
        )
    ranks = sorted({m.rank for m in a.modules.values()})
    info = {"arch": written.arch, "alpha": written.alpha, "outtype": outtype, "folded": written.folded}
    return ConvertResult(
        output=out, source_format=source, format="gguf", modules=written.tensors // 2, ranks=ranks,
        parameters=written.parameters, parameters_before=before, portable=False, warnings=warnings, gguf=info,
    )  # fmt: skip


def _from_gguf(path: Path, base: str | os.PathLike[str], allow_pickle: bool) -> tuple[Adapter, list[str]]:
    """A llama.cpp LoRA adapter read back against its base, refused unless it fits it."""
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        config, keys = ck.config(), list(ck.keys())
    read = read_gguf(path, config=config, base_keys=keys)
    require_finite(read.adapter)
    _require_fit(read.adapter, base, allow_pickle)
    warnings = []
    if read.dropped:
        warnings.append(f"left out {len(read.dropped)} norm tensor(s) ({', '.join(read.dropped[:3])}"
                        f"{', ...' if len(read.dropped) > 3 else ''}): llama.cpp's loader skips them too")  # fmt: skip
    return read.adapter, warnings


def _check_arguments(
    to: str, *, portable: bool, base: object, dtype: str | None, outtype: str, split: Sequence[Fusion],
    from_gguf: bool = False, fuse: Sequence[Fusion] = (),
) -> None:  # fmt: skip
    for option, fusions in (("--fuse", fuse), ("--split", split)):
        names = [name for fused, parts in fusions for name in (fused, *parts)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise LoraToolError(
                f"{option} names {', '.join(twice)} more than once: each fused module and each part belongs to one "
                f"{option}", fix=f"give each {option} its own FUSED name and parts",
            )  # fmt: skip
    if to not in TARGETS:
        raise LoraToolError(f"unknown target format {to!r}", fix=f"use one of {', '.join(TARGETS)}")
    if from_gguf and base is None:
        raise LoraToolError(
            "reading a GGUF adapter needs the base checkpoint: llama.cpp names tensors by its own table, and only "
            "the base's names and config.json lead back to module paths",
            fix="pass the checkpoint the adapter was made for (the transformers folder) as --base",
        )
    if portable:
        transforms.check_portable(to)
    if to == "gguf" and base is None:
        raise LoraToolError(
            "GGUF output needs the base checkpoint: its config.json names llama.cpp's architecture and tensors",
            fix="pass the checkpoint the adapter was trained on as --base",
        )
    if split and base is None:
        raise LoraToolError(
            "--split needs the base checkpoint: its split weights give each part's size",
            fix="pass the (split) checkpoint the adapter is for as --base",
        )
    if to != "gguf" and outtype != "f32":
        raise LoraToolError(f"--outtype is for GGUF output; {to} keeps torch dtypes", fix="use --dtype")
    if to == "gguf" and dtype is not None:
        raise LoraToolError("GGUF tensor types are chosen with --outtype", fix="use --outtype f32|f16|bf16|q8_0")


def _require_fit(a: Adapter, base: str | os.PathLike[str], allow_pickle: bool) -> None:
    report = ValidationReport(str(a.path), a.format)
    check_fit(a, base, report, allow_pickle=allow_pickle)
    if not report.valid:
        first = report.problems[0]
        raise ShapeMismatchError(
            f"the adapter does not fit the base: {first.path}: {first.message}", path=str(base),
            fix="pass the checkpoint the adapter is for as --base (loratool validate --base lists every miss)",
        )  # fmt: skip


def _part_sizes(base: str | os.PathLike[str], parts: Sequence[str], allow_pickle: bool) -> Callable[[str], list[int]]:
    """Each part's output size under a parent module, read from the base's headers."""
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        shapes = {k: tuple(ck.info(k).shape) for k in ck.keys() if k.endswith(".weight")}

    def sizes(parent: str) -> list[int]:
        keys = [f"{parent}.{part}.weight" if parent else f"{part}.weight" for part in parts]
        missing = [k for k in keys if k not in shapes]
        if missing:
            raise MissingKeyError(
                "the base has no such weight to size a split part", path=str(base), key=missing[0],
                fix="pass the split checkpoint the adapter is for as --base",
            )  # fmt: skip
        return [shapes[k][0] for k in keys]

    return sizes


def _from_mlx_tied(a: Adapter, base: str | os.PathLike[str] | None, allow_pickle: bool, warnings: list[str]) -> Adapter:
    """An mlx-lm adapter's embedding LoRA on a tied base acts on the output layer too (mlx-lm's head is
    the embedding's ``as_linear``), where PEFT applies a LoRA to the module it names only: the head
    gets the embedding's LoRA, transposed, as extract gives a tied head (PEFT then serves what mlx-lm
    served; merge adds it once). Without ``base`` to say whether the model ties, a warning."""
    from .. import arch

    embeds = [p for p, m in a.modules.items() if m.kind == "embedding"]
    if not embeds or arch.OUTPUT_LAYER in a.modules:
        return a
    if base is None:
        warnings.append(f"mlx-lm applies an embedding's LoRA ({embeds[0]}) to the output layer too where the base "
                        "ties them, and PEFT does not: give --base to convert it as mlx-lm serves it")  # fmt: skip
        return a
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        tied = arch.tied_output(list(ck.keys()), ck.config())
    embed = tied[1].removesuffix(".weight") if tied else None
    if tied is None or embed not in a.modules:
        return a
    warnings.append(f"{tied[0]} is tied to {embed} in this base, and mlx-lm applies the embedding's LoRA to both: "
                    "it gets the same factors, transposed")  # fmt: skip
    return dataclasses.replace(a, modules={**a.modules, tied[0]: arch.transposed_copy(a.modules[embed])})


def _tied_for_mlx(a: Adapter, base: str | os.PathLike[str] | None, allow_pickle: bool, warnings: list[str]) -> Adapter:
    """The adapter as mlx-lm serves it on ``base`` (:func:`loratool.runtimes.mlx.tied_for_mlx`), or raise."""
    a, problems, notes = mlx.tied_for_mlx_on(a, base, allow_pickle=allow_pickle)
    if problems:
        raise problems[0].error(a.path, len(problems) - 1)
    warnings += [n.split(": ", 1)[1] for n in notes]
    return a


def _drop_unchanged(a: Adapter, base: str | os.PathLike[str], warnings: list[str]) -> None:
    """Leave out whole tensors equal to the base's (llama.cpp and mlx-lm take none), saying so."""
    same = transforms.unchanged_whole(a, base)
    if same:
        a.whole = {k: t for k, t in a.whole.items() if k not in same}
        warnings.append(f"left out {len(same)} whole tensor(s) equal to the base's ({', '.join(same)}): "
                        "PEFT saves targeted embedding layers whole even when they did not change")  # fmt: skip


def _components(
    a: Adapter, to: str, base: str | os.PathLike[str] | None, allow_pickle: bool, warnings: list[str]
) -> Adapter:
    """Into or out of diffusers' layout, whose module paths start with their pipeline component: the
    component is the one ``base`` is (``PIPE/unet``)."""
    if (a.format == "diffusers") == (to == "diffusers"):
        return a
    component = None
    if base is not None:
        with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
            component = diffusers.component_of(ck.root, ck.config())
    if a.format == "diffusers":
        a, left_out = diffusers.for_component(a, component, str(base) if base is not None else "no --base")
        if left_out:
            warnings.append(f"{len(left_out)} module(s) of other pipeline components left out (first: {left_out[0]})")
        return a
    if component is None:
        raise InputFileError(
            "--to diffusers names modules by pipeline component, and no --base says which component this is",
            path=a.path, fix="give --base PIPELINE/unet (or PIPELINE/transformer, the component the adapter is for)",
        )  # fmt: skip
    return dataclasses.replace(a, modules={f"{component}.{p}": m for p, m in a.modules.items()}, format="diffusers")


def _name_from(adapter: Adapter, base: str | os.PathLike[str], allow_pickle: bool) -> None:
    """Rename kohya prefixes to the base's module paths (headers only); of a pipeline component's
    (``PIPE/unet``), only the modules kohya names for that component are kept."""
    with open_checkpoint(base, allow_pickle=allow_pickle) as ck:
        paths = [k.removesuffix(".weight") for k in live_keys(ck) if k.endswith(".weight")]  # the model's names
        kept, _ = diffusers.for_base(adapter, ck)  # of a pipeline component's folder, its own modules
        adapter.modules = kept.modules
    found = resolve_paths(adapter, paths)
    missing = [m for m in adapter.modules if m not in found]
    if missing:
        raise LoraToolError(
            f"{len(missing)} module(s) name no weight of the base (first: {missing[0]})",
            path=str(base),
            fix="pass the checkpoint this adapter was trained on as --base",
        )
    adapter.modules = {found[m]: mod for m, mod in adapter.modules.items()}


def _require_paths(adapter: Adapter) -> None:
    unnamed = [m for m in adapter.modules if "." not in m]
    if unnamed:
        raise LoraToolError(
            f"the kohya file names modules by prefixes ({unnamed[0]}), not by module paths",
            path=adapter.path,
            fix="pass the base checkpoint as --base to name them",
        )


def _files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
