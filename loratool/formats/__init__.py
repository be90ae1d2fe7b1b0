"""Adapter file formats: reading and writing, dispatched by path (PEFT directory or kohya file).

Each format module exposes one public key parser (``parse_key``) used by its reader and by
``validate``, a reader and a writer. :mod:`loratool.adapter` holds the in-memory model only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..adapter import Adapter
from ..errors import (
    InputFileError,
    LoraToolError,
    MetadataError,
    MissingInputError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
)

if TYPE_CHECKING:
    import torch

Format = Literal["peft", "kohya", "mlx", "diffusers"]
PathArg = str | os.PathLike[str]
# what the API takes for an adapter: a path, an Adapter, or either with a scale (weight)
AdapterArg = PathArg | Adapter | tuple[PathArg, float] | tuple[Adapter, float]


def split_scale(item: AdapterArg) -> tuple[PathArg | Adapter, float]:
    """``(adapter, scale)`` from an API argument; the scale defaults to 1 and must be finite."""
    source, scale = item if isinstance(item, (tuple, list)) else (item, 1.0)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        name = source.path if isinstance(source, Adapter) else str(source)
        raise LoraToolError(f"the scale of this adapter is {scale!r}", path=name, fix="give a finite number")
    return source, float(scale)


def load_adapter(path: str | os.PathLike[str], *, allow_pickle: bool = False, lazy: bool = False) -> Adapter:
    """Read a PEFT adapter directory, a kohya ``.safetensors`` file, or an mlx-lm adapter directory.

    Args:
        path: a directory holding ``adapter_config.json`` and ``adapter_model.safetensors``, or a
            single kohya-format ``.safetensors`` file.
        allow_pickle: accept ``adapter_model.bin`` (loaded with ``torch.load(weights_only=True)``).
        lazy: read headers only; factors are ``meta`` tensors with the stored shapes and dtypes.

    Raises:
        InputFileError: not an adapter, corrupt file, unsupported PEFT type.

    Example:
        >>> adapter = loratool.load_adapter("adapter/")
        >>> {path: m.rank for path, m in adapter.modules.items()}
    """
    from ..runtimes import mlx
    from . import diffusers, kohya, peft

    p = Path(path)
    if not p.exists():
        raise MissingInputError("no such adapter", path=str(p))
    directory = p if p.is_dir() else p.parent
    if (p.is_dir() or p.name in (peft.CONFIG_NAME, mlx.WEIGHTS_NAME)) and mlx.is_mlx_dir(directory):
        adapter = mlx.read_mlx(directory, lazy=lazy)
    elif p.is_dir() or p.name == peft.CONFIG_NAME:
        adapter = peft.read_peft(p if p.is_dir() else p.parent, allow_pickle=allow_pickle, lazy=lazy)
    elif p.suffix == ".safetensors" and _is_diffusers_file(p):
        adapter = diffusers.read_diffusers(p, lazy=lazy)
    elif p.suffix == ".safetensors":
        adapter = kohya.read_kohya(p, lazy=lazy)
    else:
        raise _not_an_adapter(p)
    _require_well_formed(adapter)
    _require_finite_scaling(adapter)
    if not lazy:
        require_finite(adapter)
    return adapter


def _is_diffusers_file(p: Path) -> bool:
    """A diffusers LoRA file (``unet.<module>.lora_A.weight`` keys), from its header."""
    from ..io.checkpoint import open_checkpoint
    from . import diffusers

    with open_checkpoint(p) as ck:
        return diffusers.is_diffusers(ck.keys())


def _require_well_formed(adapter: Adapter) -> None:
    """What every format's reader can be handed but no command can apply: an adapter that holds
    nothing (every merge of it a silent copy of the base), a module of rank 0 (no factors; its
    scaling alpha / 0), and ``use_dora`` without the trained magnitudes (PEFT would start them from
    the base's weight norms and merge something else than the plain sum loratool would)."""
    if not (adapter.modules or adapter.whole or adapter.token_rows):
        raise InputFileError("the adapter holds no LoRA factors and no tensors", path=adapter.path,
                             fix="its weights file is empty: export or save the adapter again")  # fmt: skip
    for path, m in adapter.modules.items():
        if m.rank == 0:
            raise ShapeMismatchError("the module has rank 0: lora_A and lora_B hold no factors", path=adapter.path,
                                     key=path, expected="A (r, in), B (out, r) with r >= 1",
                                     got=f"A {list(m.lora_A.shape)}, B {list(m.lora_B.shape)}")  # fmt: skip
    bare = next((path for path, m in adapter.modules.items() if m.magnitude is None and _uses_dora(adapter, path)),
                None)  # fmt: skip
    if bare is not None:
        raise MissingKeyError(
            "use_dora is true in the adapter's LoraConfig, but this module has no lora_magnitude_vector: PEFT "
            "would start it from the base's weight norms and merge something else than the trained adapter",
            path=adapter.path, key=bare,
            fix="save the adapter again with PEFT (save_pretrained keeps the magnitudes), or set use_dora to "
            "false if it was not trained with DoRA",
        )  # fmt: skip


def _uses_dora(adapter: Adapter, path: str) -> bool:
    """Whether the LoraConfig of module ``path`` sets use_dora: the adapter's, or in a diffusers file
    (``config["components"]``) that of the module's pipeline component."""
    components = adapter.config.get("components")
    config = (components.get(path.partition(".")[0]) or {}) if components else adapter.config
    return config.get("use_dora") is True


def _require_finite_scaling(adapter: Adapter) -> None:
    """Every module's alpha and scaling finite (a NaN reaches torch's addmm as alpha=nan, which
    behaves as 1): refused here, whatever the format said it with."""
    for path, module in adapter.modules.items():
        if not (math.isfinite(module.alpha) and math.isfinite(module.scaling)) or abs(module.scaling) > _FLOAT32_MAX:
            raise MetadataError(
                f"the module's alpha is {module.alpha} (scaling {module.scaling}): a scaling must be a finite number "
                "that float32, where the arithmetic is done, can hold (at most 3.4e38)",
                path=adapter.path, key=path,
                fix="set lora_alpha (or its alpha_pattern entry, mlx-lm's scale, kohya's .alpha) to a finite number",
            )  # fmt: skip


_FLOAT32_MAX = 3.4028234663852886e38


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an adapter (PEFT directory or file, kohya or PEFT-keyed ``.safetensors``)
    rather than a checkpoint; from names and headers only."""
    from ..io.checkpoint import open_checkpoint

    p = Path(path)
    if p.is_dir():
        return (p / "adapter_config.json").is_file()
    if p.name == "adapter_config.json":
        return True
    if p.suffix == ".safetensors" and p.is_file():
        with open_checkpoint(p, headers_only=True) as ck:
            return any(k.endswith(_ADAPTER_KEY_ENDINGS) for k in ck.keys())
    return False


_ADAPTER_KEY_ENDINGS = (".lora_down.weight", ".lora_A.weight", ".lora_embedding_A", ".hada_w1_a", ".lokr_w1",
                        ".lokr_w1_a")  # fmt: skip


def refuse_adapter(path: str | os.PathLike[str], role: str, usage: str) -> None:
    """Refuse an adapter given where a checkpoint goes (arguments swapped, say), saying which is which.

    Raises:
        InputFileError: ``path`` is an adapter.
    """
    if is_adapter(path):
        raise InputFileError(f"this is an adapter, where {role} goes", path=str(path), fix=f"the order is: {usage}")


def require_finite(adapter: Adapter) -> None:
    """NaN or Inf in a factor would go on into every weight it touches: refuse it here, naming it."""
    from ..math.linalg import is_finite

    tensors = [
        (f"{path}.{slot}", t)
        for path, m in adapter.modules.items()
        for slot, t in (("lora_A", m.lora_A), ("lora_B", m.lora_B), ("lora_B.bias", m.bias), ("magnitude", m.magnitude))
        if t is not None
    ]
    for key, t in [*tensors, *adapter.whole.items()]:
        if not is_finite(t):
            raise NonFiniteError(
                "holds NaN or Inf", path=adapter.path, key=key, fix="the adapter is broken: export or train it again"
            )


def _not_an_adapter(p: Path) -> InputFileError:
    if p.suffix == ".gguf":
        return InputFileError(
            "a llama.cpp GGUF adapter: loratool reads it only through convert, which needs its base",
            path=str(p), fix=f"loratool convert {p} --to peft --base MODEL -o adapter/, then use adapter/",
        )  # fmt: skip
    return InputFileError(
        "not an adapter",
        path=str(p),
        fix="give a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) "
        "or a kohya .safetensors file",
    )


def check_output_name(out: str | os.PathLike[str], format: str) -> None:
    """A kohya or diffusers adapter is one ``.safetensors`` file, which ComfyUI, diffusers and
    :func:`load_adapter` find by that suffix: refused before any work for a name without it (a file
    named ``out`` or ``out/`` was written that nothing, loratool included, reads as an adapter)."""
    if format in ("kohya", "diffusers") and Path(out).suffix != ".safetensors":
        raise LoraToolError(
            f"a {format} adapter is one .safetensors file, and the output '{out}' does not end in .safetensors",
            fix="name the output file NAME.safetensors (e.g. -o adapter.safetensors)",
        )


def save_adapter(
    adapter: Adapter,
    out: str | os.PathLike[str],
    *,
    format: Format = "peft",
    force: bool = False,
    dtype: torch.dtype | None = None,
    card: bool = True,
) -> Path:
    """Write an adapter atomically: a PEFT directory (with a README.md model card unless
    ``card=False``), a kohya ``.safetensors`` file, or an mlx-lm directory.

    Example:
        >>> loratool.save_adapter(adapter, "copy/", dtype=torch.bfloat16)
    """
    from ..runtimes import mlx
    from . import diffusers, kohya, peft

    check_output_name(out, format)
    if format == "kohya":
        return kohya.write_kohya(adapter, Path(out), force=force, dtype=dtype)
    if format == "diffusers":
        return diffusers.write_diffusers(adapter, Path(out), force=force, dtype=dtype)
    if format == "mlx":
        return mlx.write_mlx(adapter, Path(out), force=force, dtype=dtype)
    return peft.write_peft(adapter, Path(out), force=force, dtype=dtype, card=card)
