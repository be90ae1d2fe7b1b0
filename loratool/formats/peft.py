"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

The reader is tolerant, as PEFT's loader is: keys with or without ``base_model.model.``, with or
without an adapter name inside (``lora_A.default.weight``), F32/F16/BF16. The writer emits exactly
what ``PeftModel.from_pretrained`` expects.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import experts
from ..adapter import CONV_LORA_FIX, CONV_LORA_WHY, Adapter, LoraModule, conv_factors, conv_file_factors, module_alpha
from ..errors import (
    InputFileError,
    MetadataError,
    MissingInputError,
    MissingKeyError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from ..io.atomic import atomic_output
from ..io.checkpoint import open_checkpoint
from ..io.writer import save_tensors
from ..metadata.provenance import with_tensors_digest
from ..metadata.schema import check
from .output import require_finite_output

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

_FACTOR = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)$")
_EMBED = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?$")
_MAGNITUDE = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector(?:\.(?P<name>[^.]+))?(?:\.weight)?$")


@dataclass(frozen=True)
class PeftKey:
    """What a PEFT adapter key names: a LoRA factor, bias or DoRA magnitude of one module."""

    module: str  # the module path in the base model, without ``base_model.model.``
    slot: str  # lora_A, lora_B, lora_B.bias, lora_embedding_A, lora_embedding_B or magnitude
    adapter_name: str | None = None  # ``default`` in ``lora_A.default.weight``

    @property
    def factor(self) -> str | None:
        """``A`` or ``B`` for a factor (linear or embedding), else None."""
        return self.slot[-1] if self.slot in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") else None


def parse_key(key: str) -> PeftKey | None:
    """Parse a key of ``adapter_model.safetensors``; None for a whole tensor (modules_to_save, base_layer).

    Accepts keys with or without ``base_model.model.`` and with or without an adapter name.
    """
    short = strip_prefix(key)
    if m := _FACTOR.match(short):
        slot = f"lora_{m['ab']}" + (".bias" if m["param"] == "bias" else "")
    elif m := _EMBED.match(short):
        slot = f"lora_embedding_{m['ab']}"
    elif m := _MAGNITUDE.match(short):
        slot = "magnitude"
    else:
        return None
    return PeftKey(m["path"], slot, m["name"])


def strip_prefix(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def base_key(key: str) -> str:
    """The base-model tensor a whole-tensor adapter entry replaces."""
    key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    return key.replace(".base_layer.", ".")


def read_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise MissingInputError(
            f"no {CONFIG_NAME} in the adapter directory",
            path=str(directory),
            fix="a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors",
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputFileError(f"not valid JSON ({e})", path=str(cfg_path)) from None
    if not isinstance(config, dict):
        raise InputFileError("must hold a JSON object", path=str(cfg_path))
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputFileError(f"peft_type is {peft_type!r}; loratool handles LoRA adapters only", path=str(cfg_path))
    problems = check(config, "adapter_config")  # before any field is read: validate's rules, for every reader
    if problems:
        raise MetadataError(
            f"not a valid adapter config: {'; '.join(f'{at}: {message}' for at, message in problems)}",
            path=str(cfg_path), problems=problems, fix="correct those fields (`loratool validate` checks the adapter)",
        )  # fmt: skip
    return config


def weights_path(directory: Path, *, allow_pickle: bool) -> Path:
    st = directory / WEIGHTS_NAME
    if st.is_file():
        return st
    if (directory / PICKLE_WEIGHTS_NAME).is_file():
        if allow_pickle:
            return directory / PICKLE_WEIGHTS_NAME
        raise InputFileError(
            f"the adapter's weights are a pickle file ({PICKLE_WEIGHTS_NAME})",
            path=str(directory),
            fix="re-save it with safetensors, or pass --allow-pickle if you trust its source",
        )
    raise MissingInputError(f"no {WEIGHTS_NAME} in the adapter directory", path=str(directory))


# LoraConfig fields of PEFT's LoRA variants whose delta is not scaling * B @ A of the stored factors (each is
# refused by name: read as plain LoRA they merged as something else, or were refused as "an adapter for another
# model" for their extra tensors); VeLoRA and MiCA are plain LoRA at inference and read as such.
LORA_VARIANTS = {
    "kasa_config": "KaSA: its delta is B @ diag(lora_diag) @ A, on a base PEFT truncates by SVD when it loads it",
    "monteclora_config": "MonteCLoRA: its delta mixes experts sampled from learned distributions",
    "arrow_config": "Arrow: a router picks among LoRA experts per token, so there is no one delta",
    "use_bdlora": "BD-LoRA: it stores block-diagonal factors in a compact layout",
    "use_qalora": "QALoRA: its lora_A reads the input pooled by groups (for GPTQ bases)",
}
TRAINING_BUFFERS = re.compile(r"\.lora_velora_[a-z_]+(\.[^.]+)?$")  # VeLoRA's projection, used by the backward pass


def read_peft(directory: Path, *, allow_pickle: bool = False, lazy: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter directory into an :class:`Adapter` (``lazy``: shapes only, on ``meta``)."""
    config = read_config(directory)
    variant = next((f for f in LORA_VARIANTS if config.get(f)), None)
    if variant is not None:
        raise UnsupportedAdapterError(
            f"{variant} is set: {LORA_VARIANTS[variant]}; loratool reads LoRA whose delta is scaling * B @ A, and DoRA",
            path=str(directory), fix="merge it with PEFT's merge_and_unload where PEFT can, or serve it with PEFT",
        )  # fmt: skip
    wpath = weights_path(directory, allow_pickle=allow_pickle)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    token_rows: dict[str, tuple[list[int], torch.Tensor]] = {}
    names: set[str] = set()
    with open_checkpoint(wpath, allow_pickle=allow_pickle) as ckpt:
        metadata = ckpt.header_metadata
        for raw_key in ckpt.keys():
            tensor = ckpt.get_meta(raw_key) if lazy else ckpt.get(raw_key)
            if raw_key.endswith(TOKEN_ROWS_SUFFIX):
                module = strip_prefix(raw_key)[: -len(TOKEN_ROWS_SUFFIX)]
                token_rows[module + ".weight"] = (_token_indices(config, module, wpath), tensor)
                continue
            parsed = parse_key(raw_key)
            if parsed is None and TRAINING_BUFFERS.search(raw_key):
                continue
            if parsed is None:
                whole[base_key(strip_prefix(raw_key))] = tensor
                continue
            if parsed.adapter_name:
                names.add(parsed.adapter_name)
            parts.setdefault(parsed.module, {})[parsed.slot] = tensor
    if len(names) > 1:
        raise InputFileError(
            f"the file holds several adapters ({', '.join(sorted(names))})",
            path=str(wpath),
            fix="save each adapter to its own directory",
        )
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules = {}
    for path, slots in parts.items():
        param = _expert_parameter(config, path, wpath)
        if param is None:
            modules[path] = module_from_slots(path, slots, config, use_rslora, fan_in_fan_out, wpath)
            continue
        a, b = slots.get("lora_A"), slots.get("lora_B")
        if a is None or b is None:
            raise MissingKeyError("has one LoRA factor of two", path=str(wpath), key=path)
        try:
            modules.update(experts.split_experts(param, a, b, experts.rank_of(config, param),
                                                 module_alpha(config, param), use_rslora))  # fmt: skip
        except ValueError as e:
            raise ShapeMismatchError(str(e), path=str(wpath), key=path) from None
    return Adapter(modules=modules, whole=whole, token_rows=token_rows, config=config, metadata=metadata,
                   format="peft", path=str(directory))  # fmt: skip


TOKEN_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def token_indices(config: dict[str, Any], module: str) -> list[int] | None:
    """The rows PEFT's ``trainable_token_indices`` gives ``module``: a list names the input
    embedding's; a dict maps module names (or dotted suffixes) to lists. None if it names none."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    return list(spec) if isinstance(spec, list) and all(isinstance(i, int) for i in spec) else None


def _token_indices(config: dict[str, Any], module: str, file: Path) -> list[int]:
    found = token_indices(config, module)
    if found is None:
        raise InputFileError(
            f"{module} has trainable tokens but trainable_token_indices gives it no list of rows", path=str(file)
        )
    return found


def _expert_parameter(config: dict[str, Any], wrapper: str, file: Path) -> str | None:
    """The 3-D parameter a ``target_parameters`` key prefix adapts, or None for a plain module."""
    if not config.get("target_parameters"):
        return None
    try:
        return experts.wrapper_parameter(config, wrapper)
    except ValueError as e:
        raise UnsupportedAdapterError(str(e), path=str(file)) from None


def module_from_slots(
    path: str, slots: dict[str, torch.Tensor], config: dict[str, Any], use_rslora: bool, fifo: bool, file: Path
) -> LoraModule:
    if "lora_embedding_A" in slots or "lora_embedding_B" in slots:
        a, b, kind = slots.get("lora_embedding_A"), slots.get("lora_embedding_B"), "embedding"
    else:
        a, b, kind = slots.get("lora_A"), slots.get("lora_B"), ("conv1d" if fifo else "linear")
    if a is None or b is None:
        which = "lora_A" if a is None else "lora_B"
        raise MissingKeyError(
            f"module has one LoRA factor but not {which}",
            path=str(file),
            key=path,
            fix="the adapter file is incomplete: re-save it",
        )
    kernel = None
    if a.dim() == 4 and b.dim() == 4 and kind == "linear":  # PEFT's Conv2d: A (r, in, kh, kw), B (out, r, 1, 1)
        conv = conv_factors(a, b)
        if conv is None:
            raise ShapeMismatchError(
                "a Conv2d LoRA's lora_A (r, in, kh, kw) and lora_B (out, r, 1, 1) do not fit each other",
                path=str(file), key=path, expected="A (r, in, kh, kw), B (out, r, 1, 1)",
                got=f"A {list(a.shape)}, B {list(b.shape)}",
            )  # fmt: skip
        a, b, kernel = conv
        kind = "conv2d"
    elif a.dim() in (3, 5) or b.dim() in (3, 5):
        raise UnsupportedAdapterError(
            f"{CONV_LORA_WHY} (lora_A {list(a.shape)}, lora_B {list(b.shape)})", path=str(file), key=path,
            fix=CONV_LORA_FIX,
        )  # fmt: skip
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ShapeMismatchError(
            "lora_A (r, in) and lora_B (out, r) do not share a rank",
            path=str(file),
            key=path,
            expected="A (r, in), B (out, r)",
            got=f"A {list(a.shape)}, B {list(b.shape)}",
        )
    return LoraModule(
        lora_A=a,
        lora_B=b,
        alpha=module_alpha(config, path),
        kind=kind,  # type: ignore[arg-type]
        use_rslora=use_rslora,
        bias=slots.get("lora_B.bias"),
        magnitude=slots.get("magnitude"),
        kernel=kernel,
    )


def new_config(*, base_model_name_or_path: str | None, task_type: str | None) -> dict[str, Any]:
    """The starting ``adapter_config.json`` of an adapter loratool makes (extract, combine, resize):
    scaling folded into the factors' alphas, so no rsLoRA; :func:`build_config` fills in the rest."""
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def build_config(adapter: Adapter) -> dict[str, Any]:
    """An ``adapter_config.json`` that makes PEFT rebuild every module's rank and scaling exactly.

    The most common rank and alpha become ``r``/``lora_alpha``; other modules get full-path entries
    in ``rank_pattern``/``alpha_pattern``. Full paths (not suffixes) cannot shadow one another.
    """
    cfg = dict(adapter.config)
    modules = config_modules(adapter)
    params = sorted(experts.group_experts(adapter.modules))
    rslora = {m.use_rslora for m in modules.values()}
    if len(rslora) > 1:
        raise InputFileError("modules disagree on use_rslora; PEFT has one flag per adapter")
    if modules:
        r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
        cfg["r"] = r
        cfg["lora_alpha"] = _number(alpha)
        cfg["rank_pattern"] = {p: m.rank for p, m in modules.items() if m.rank != r}
        cfg["alpha_pattern"] = {p: _number(m.alpha) for p, m in modules.items() if m.alpha != alpha}
        cfg["use_rslora"] = rslora.pop()
        cfg["target_modules"] = sorted(set(modules) - set(params))
        if params:
            cfg["target_parameters"] = params
        cfg["fan_in_fan_out"] = any(m.kind == "conv1d" for m in modules.values())
        cfg["use_dora"] = any(m.magnitude is not None for m in modules.values())
        cfg["lora_bias"] = any(m.bias is not None for m in modules.values())
    to_save = sorted({k.rsplit(".", 1)[0] for k in adapter.whole} - set(modules))
    cfg["modules_to_save"] = to_save or None
    defaults = {
        "peft_type": "LORA", "bias": "none", "lora_dropout": 0.0, "init_lora_weights": True,
        "inference_mode": True, "task_type": None, "base_model_name_or_path": None, "revision": None,
        "layers_to_transform": None, "layers_pattern": None,
    }  # fmt: skip
    for k, v in defaults.items():
        cfg.setdefault(k, v)
    return cfg


def config_modules(adapter: Adapter) -> dict[str, LoraModule]:
    """The modules as PEFT's config sees them: each 3-D expert parameter one module (its joined
    rank and alpha; factors on ``meta``), the rest as they are."""
    import torch

    out = {p: m for p, m in adapter.modules.items() if m.expert is None}
    for param, items in experts.group_experts(adapter.modules).items():
        ms = [m for _, m in items]
        rank, alpha = experts.joined_rank_alpha(ms)
        meta = torch.empty(rank, ms[0].in_features, device="meta")
        out[param] = LoraModule(meta, torch.empty(ms[0].out_features, rank, device="meta"), alpha,
                                use_rslora=ms[0].use_rslora)  # fmt: skip
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def state_dict(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``, keyed as PEFT saves them."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[PREFIX + key] = t.contiguous()

    groups = experts.group_experts(adapter.modules)
    for param, items in groups.items():
        a, b, _, _ = experts.join_experts([m for _, m in items])
        wrapper = experts.parameter_wrapper(list(groups), param)
        put(f"{wrapper}.lora_A.weight", a)
        put(f"{wrapper}.lora_B.weight", b)
    for path, m in adapter.modules.items():
        if m.expert is not None:
            continue
        if m.kind == "embedding":
            put(f"{path}.lora_embedding_A", m.lora_A)
            put(f"{path}.lora_embedding_B", m.lora_B)
        else:
            a, b = conv_file_factors(m) if m.kernel is not None else (m.lora_A, m.lora_B)
            put(f"{path}.lora_A.weight", a)
            put(f"{path}.lora_B.weight", b)
            if m.bias is not None:
                put(f"{path}.lora_B.bias", m.bias)
        if m.magnitude is not None:
            put(f"{path}.lora_magnitude_vector", m.magnitude)
    for key, (_, rows) in adapter.token_rows.items():
        put(key.removesuffix(".weight") + TOKEN_ROWS_SUFFIX, rows)
    for key, t in adapter.whole.items():
        module, param = key.rsplit(".", 1)
        # A whole tensor of a LoRA-wrapped module lives on its base layer; others are modules_to_save.
        put(f"{module}.base_layer.{param}" if module in adapter.modules else key, t)
    return out


def write_peft(
    adapter: Adapter, out: Path, *, force: bool = False, dtype: torch.dtype | None = None, card: bool = True
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory at ``out``, atomically, with a model card."""
    from ..metadata.card import render_card
    from ..metadata.provenance import decode

    tensors = state_dict(adapter, dtype)
    config = build_config(adapter)
    metadata = {"format": "pt", **{k: v for k, v in adapter.metadata.items() if k != "format"}}
    require_finite_output(tensors, out)
    metadata = with_tensors_digest(metadata, tensors)
    with atomic_output(out, force=force, directory=True) as tmp:
        save_tensors(tmp / WEIGHTS_NAME, tensors, metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
        if card:
            (tmp / "README.md").write_text(render_card(config, decode(metadata)))
    return out
