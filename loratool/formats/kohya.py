"""kohya-ss single-file adapters: ``<prefix>.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r),
``.alpha`` (a scalar); scaling = alpha / r.

kohya prefixes replace the dots of a module path with underscores, which cannot be undone from the
file alone (``self_attn`` has an underscore too). loratool therefore records the exact module path
and layer kind of every prefix in the header (``loratool_modules``); a kohya file from elsewhere
keeps its prefixes as paths, and :func:`resolve_paths` maps them onto a checkpoint's tensor names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ..adapter import CONV_LORA_FIX, CONV_LORA_WHY, Adapter, LoraModule, conv_factors, conv_file_factors
from ..errors import InputFileError, MissingKeyError, ShapeMismatchError, UnsupportedAdapterError
from ..io.atomic import atomic_output
from ..io.checkpoint import open_checkpoint
from ..io.writer import save_tensors
from ..metadata.provenance import with_tensors_digest
from .output import require_finite_output

if TYPE_CHECKING:
    import torch

_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<slot>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")
MODULES_KEY = "loratool_modules"


class KohyaKey(NamedTuple):
    prefix: str  # lora_<module path with dots as underscores>
    slot: str  # lora_down.weight, lora_up.weight, alpha or dora_scale


def parse_key(key: str) -> KohyaKey | None:
    """Parse a key of a kohya file; None when it is not one."""
    m = _KEY.match(key)
    return KohyaKey(m["prefix"], m["slot"]) if m else None


def kohya_prefix(module_path: str) -> str:
    """``lora_`` + the path with dots as underscores; a name that is already a prefix (a kohya or
    LyCORIS file's, kept where no base named its modules) stays as it is."""
    if "." not in module_path and module_path.startswith(("lora_", "lycoris_")):
        return module_path
    return "lora_" + module_path.replace(".", "_")


def read_kohya(file: Path, *, lazy: bool = False) -> Adapter:
    """Read a kohya ``.safetensors`` adapter (``lazy``: factors as shapes only, on ``meta``)."""

    from .lycoris import LYCORIS_FIX, LYCORIS_WHAT, is_lycoris

    groups: dict[str, dict[str, torch.Tensor]] = {}
    with open_checkpoint(file) as ckpt:
        metadata = ckpt.header_metadata
        if is_lycoris(list(ckpt.keys())):
            raise UnsupportedAdapterError(LYCORIS_WHAT, path=str(file), fix=LYCORIS_FIX)
        for key in ckpt.keys():
            parsed = parse_key(key)
            if parsed is None:
                if key.endswith(("lora_A.weight", "lora_B.weight", "lora_embedding_A")):
                    raise InputFileError(
                        "this is a PEFT adapter's weights file, not a kohya file",
                        path=str(file),
                        fix="pass the adapter's directory (with adapter_config.json) instead",
                    )
                raise InputFileError(
                    f"unexpected tensor '{key}' in a kohya adapter",
                    path=str(file),
                    fix="kohya files hold <prefix>.lora_down.weight, .lora_up.weight and .alpha",
                )
            read = ckpt.get_meta if lazy and parsed.slot != "alpha" else ckpt.get  # alphas are scalars: read them
            groups.setdefault(parsed.prefix, {})[parsed.slot] = read(key)
    known = json.loads(metadata.get(MODULES_KEY, "{}"))
    modules = {}
    for prefix, slots in groups.items():
        down, up = slots.get("lora_down.weight"), slots.get("lora_up.weight")
        if down is None or up is None:
            raise MissingKeyError("has only one of lora_down/lora_up", path=str(file), key=prefix)
        kernel = None
        if down.dim() == 4 and up.dim() == 4:  # LoCon: down (r, in, kh, kw), up (out, r, 1, 1)
            conv = conv_factors(down, up)
            if conv is None:
                raise ShapeMismatchError(
                    "a conv module's lora_down (r, in, kh, kw) and lora_up (out, r, 1, 1) do not fit each other",
                    path=str(file), key=prefix, got=f"down {list(down.shape)}, up {list(up.shape)}",
                )  # fmt: skip
            down, up, kernel = conv
        elif down.dim() != 2 or up.dim() != 2:
            raise UnsupportedAdapterError(
                f"{CONV_LORA_WHY} (lora_down {list(down.shape)}, lora_up {list(up.shape)})", path=str(file), key=prefix,
                fix=CONV_LORA_FIX,
            )  # fmt: skip
        if down.shape[0] != up.shape[1]:
            raise ShapeMismatchError(
                "lora_down (r, in) and lora_up (out, r) disagree on r",
                path=str(file),
                key=prefix,
                got=f"down {list(down.shape)}, up {list(up.shape)}",
            )
        r = down.shape[0]
        if "alpha" in slots and slots["alpha"].numel() != 1:
            raise ShapeMismatchError(
                "a kohya module's alpha is one number", path=str(file), key=prefix + ".alpha", expected=[],
                got=list(slots["alpha"].shape), fix="the file is damaged or not kohya's: re-export it",
            )  # fmt: skip
        alpha = float(slots["alpha"].item()) if "alpha" in slots else float(r)
        info = known.get(prefix, {})
        modules[info.get("path", prefix)] = LoraModule(
            lora_A=down,
            lora_B=up,
            alpha=alpha,
            kind="conv2d" if kernel is not None else info.get("kind", "linear"),
            magnitude=_magnitude(slots.get("dora_scale"), int(up.shape[0]), file, prefix),
            kernel=kernel,
        )
    config = {"peft_type": "LORA", "lora_alpha": None, "r": None}
    if "ss_base_model_name_or_path" in metadata:
        config["base_model_name_or_path"] = metadata["ss_base_model_name_or_path"]
    return Adapter(modules=modules, config=config, metadata=metadata, format="kohya", path=str(file))


def _magnitude(scale: torch.Tensor | None, out: int, file: Path, prefix: str) -> torch.Tensor | None:
    """A ``dora_scale`` as PEFT's ``lora_magnitude_vector`` (out,): LyCORIS stores it (out, 1, ...)
    where it rescales output rows (``wd_on_out``, PEFT's DoRA, what ComfyUI takes a scale of the
    output's length for) and (1, in, ...) where it rescales input columns, which PEFT's DoRA never
    does: that one is refused."""
    if scale is None:
        return None
    if scale.dim() >= 1 and scale.shape[0] == out and scale.numel() == out:
        return scale.reshape(out)
    raise UnsupportedAdapterError(
        f"dora_scale {list(scale.shape)} does not rescale the {out} output rows (LyCORIS's wd_on_out=False "
        "normalizes input columns), which PEFT's DoRA and loratool's merge do",
        path=str(file), key=prefix + ".dora_scale",
        fix="train with LyCORIS's wd_on_out=True, or merge with a tool that implements this decomposition",
    )  # fmt: skip


def write_kohya(adapter: Adapter, out: Path, *, force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` as one kohya ``.safetensors`` file. rsLoRA scaling is folded into alpha."""
    import torch

    if adapter.whole:
        raise InputFileError(
            f"kohya files cannot hold whole tensors ({', '.join(sorted(adapter.whole)[:3])}...)",
            fix="write the PEFT format instead (or, extracting, leave out --keep-full)",
        )
    if adapter.token_rows:
        raise InputFileError("kohya files cannot hold trainable tokens", fix="write the PEFT format instead")
    biased = sorted(p for p, m in adapter.modules.items() if m.bias is not None)
    if biased:  # sd-scripts' lora_up has none: the file would drop it, and with it part of every delta
        raise InputFileError(
            f"kohya files have no place for lora_B's bias (lora_bias: {', '.join(biased[:3])}"
            + (f" and {len(biased) - 3} more)" if len(biased) > 3 else ")"),
            fix="write the PEFT format instead, or merge the adapter into its base",
        )
    expert = next((p for p, m in adapter.modules.items() if m.expert is not None), None)
    if expert is not None:
        raise InputFileError(
            f"kohya files have no layout for 3-D expert parameters ({expert})", fix="write the PEFT format instead"
        )
    tensors: dict[str, torch.Tensor] = {}
    modules_meta: dict[str, dict[str, str]] = {}
    for path, m in adapter.modules.items():
        prefix = kohya_prefix(path)
        if prefix in modules_meta:
            raise InputFileError(f"modules '{modules_meta[prefix]['path']}' and '{path}' share a kohya name")
        a, b = conv_file_factors(m) if m.kernel is not None else (m.lora_A, m.lora_B)
        a, b = a.detach().cpu(), b.detach().cpu()
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        tensors[f"{prefix}.lora_down.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_up.weight"] = b.contiguous()
        if m.magnitude is not None:  # LyCORIS's layout for output rows (wd_on_out): (out, 1, ...)
            scale = m.magnitude.detach().cpu().to(dtype or m.magnitude.dtype)
            tensors[f"{prefix}.dora_scale"] = scale.reshape(-1, *[1] * (b.dim() - 1)).contiguous()
        # kohya scales by alpha / r: store the alpha that gives this module's exact scaling.
        tensors[f"{prefix}.alpha"] = torch.tensor(m.scaling * m.rank, dtype=torch.float32)
        modules_meta[prefix] = {"path": path, "kind": m.kind}
    ranks = {m.rank for m in adapter.modules.values()}
    alphas = {m.scaling * m.rank for m in adapter.modules.values()}
    metadata = {k: v for k, v in adapter.metadata.items() if k != "format"}
    metadata.update(
        {
            "format": "pt",
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(_num(alphas.pop())) if len(alphas) == 1 else "Dynamic",
            MODULES_KEY: json.dumps(modules_meta, sort_keys=True, allow_nan=False),
        }
    )
    if adapter.base_model_name_or_path:
        metadata["ss_base_model_name_or_path"] = adapter.base_model_name_or_path
    require_finite_output(tensors, out)
    metadata = with_tensors_digest(metadata, tensors)
    with atomic_output(out, force=force, directory=False) as tmp:
        save_tensors(tmp, tensors, metadata)
    return out


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def resolve_paths(adapter: Adapter, module_paths: list[str]) -> dict[str, str]:
    """Map each module of ``adapter`` onto one of ``module_paths`` (a checkpoint's modules).

    Exact paths map to themselves; kohya prefixes map when the underscored path ends the prefix
    (``lora_unet_down_0_attn`` -> ``down.0.attn``). Unmatched modules are left out of the result.
    """
    by_underscore: dict[str, list[str]] = {}
    for p in module_paths:
        by_underscore.setdefault(p.replace(".", "_"), []).append(p)
    known = set(module_paths)
    found = {}
    for name in adapter.modules:
        if name in known:
            found[name] = name
            continue
        stem = name[len("lora_") :] if name.startswith("lora_") else name
        candidates = [p for u, ps in by_underscore.items() if stem == u or stem.endswith("_" + u) for p in ps]
        if candidates:
            found[name] = max(candidates, key=len)  # the longest tail is the most specific match
    return found
