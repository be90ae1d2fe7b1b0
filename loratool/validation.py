"""Adapter checks: metadata against ``schemas/``, and structure against the tensors.

Shared by ``loratool validate`` and by every operation that must not act on what validate rejects (push).

Reports every problem at once, sorted, each with a path (``$.r`` in the config,
``tensors/<key>`` for a tensor, ``header/loratool...`` for the provenance record) and a plain
message. Tensors are read one at a time, so a large adapter is never loaded whole.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import experts
from .adapter import CONV_LORA_FIX, CONV_LORA_WHY, Adapter, LoraModule, pattern_lookup
from .arch import (
    OUTPUT_LAYER,
    RENAMED_WHY,
    UNTIED_FIX,
    UNTIED_WHY,
    is_embedding,
    is_tied_copy,
    is_tied_head_unchanged,
    renamed_on_load,
    tied_output,
    untied_partner,
)
from .errors import LoraToolError, MetadataError, UnsupportedCheckpointError
from .formats import diffusers, kohya, load_adapter, peft
from .formats.kohya import resolve_paths
from .io.checkpoint import FLOAT_DTYPES, Checkpoint, dtype_kind, open_checkpoint
from .io.logical import model_view
from .metadata.provenance import PROVENANCE_KEY, decode, tensors_sha256
from .metadata.schema import check
from .runtimes import mlx


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ValidationReport:
    """The verdict on one adapter: ``valid`` is True when ``problems`` is empty."""

    path: str
    format: str
    problems: list[Problem] = field(default_factory=list)
    modules: int = 0
    sha256_checked: bool = False
    warnings: list[Problem] = field(default_factory=list)  # what readers may take differently; not invalid

    @property
    def valid(self) -> bool:
        return not self.problems

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "valid": self.valid,
            "modules": self.modules,
            "sha256_checked": self.sha256_checked,
            "problems": [{"path": p.path, "message": p.message} for p in self.problems],
            "warnings": [str(w) for w in self.warnings],
        }


def validate_adapter(
    adapter: str | os.PathLike[str], *, check_values: bool = True, allow_pickle: bool = False
) -> ValidationReport:
    """Validate an adapter's metadata and structure.

    Args:
        adapter: a PEFT adapter directory or a kohya ``.safetensors`` file.
        check_values: also read every tensor to check it is finite and matches the recorded digest.

    Returns:
        A :class:`ValidationReport`; it never raises for an invalid adapter (``valid`` says).

    Example:
        >>> report = loratool.validate("adapter/")
        >>> report.valid, [str(p) for p in report.problems]
    """
    p = Path(adapter)
    if not p.exists():
        report = ValidationReport(str(p), "unknown")
        report.add("$", "no such file or directory")
        return report
    if p.is_dir() and mlx.is_mlx_dir(p):
        return _sorted(_validate_mlx(p, report=ValidationReport(str(p), "mlx"), check_values=check_values))
    if p.is_dir():
        report = ValidationReport(str(p), "peft")
        config = _check_config(p, report)
        try:
            wpath = peft.weights_path(p, allow_pickle=allow_pickle)
        except LoraToolError as e:
            report.add("tensors", e.message)
            return _sorted(report)
    else:
        report = ValidationReport(str(p), "kohya")
        config, wpath = None, p
    try:
        ckpt = open_checkpoint(wpath, allow_pickle=allow_pickle)
    except LoraToolError as e:
        report.add("tensors", e.message)
        return _sorted(report)
    with ckpt:
        if report.format == "peft":
            if config is not None:  # the structure is read through the config: not while the config is invalid
                _check_peft_structure(ckpt, config, report)
        elif diffusers.is_diffusers(ckpt.keys()):
            report.format = "diffusers"
            _check_diffusers_structure(ckpt, report)
        else:
            _check_kohya_structure(ckpt, report)
        _check_dtypes(ckpt, report)
        _check_provenance(ckpt, report, check_values)
    if report.valid:
        _check_as_read(p, report, allow_pickle)
    return _sorted(report)


def _check_as_read(path: Path, report: ValidationReport, allow_pickle: bool) -> None:
    """What the commands' own reading of the adapter refuses, which the checks above let through (an
    alpha whose scaling float32 cannot hold: valid by the schema, refused by every merge), as a
    problem; and a warning of modules scaled by 0 (an alpha of 0): every reader loads and merges them
    as written, as nothing, which is rarely what was meant. (A negative alpha subtracts on purpose.)"""
    try:
        adapter = load_adapter(path, allow_pickle=allow_pickle, lazy=True)  # headers, and kohya's alpha scalars
    except LoraToolError as e:
        report.add("$" if e.key is None else f"modules/{e.key}", e.message + (f"; {e.fix}" if e.fix else ""))
        return
    zero = sorted(name for name, m in adapter.modules.items() if m.scaling == 0)
    if zero:
        report.warnings.append(Problem("modules", f"{len(zero)} module(s) scaled by 0 (alpha 0) add nothing to the "
                                                  f"model (first: {zero[0]})"))  # fmt: skip


def check_against_base(
    adapter: str | os.PathLike[str],
    base: str | os.PathLike[str],
    report: ValidationReport,
    *,
    allow_pickle: bool = False,
) -> None:
    """Does the adapter fit ``base``? Every module must name a weight of the base with the shape its
    factors imply, and every whole tensor (``modules_to_save``) a tensor of the same shape: an
    adapter whose modules match nothing loads in PEFT and does nothing. From headers only."""
    try:
        adapter_obj = load_adapter(adapter, allow_pickle=allow_pickle, lazy=True)
    except LoraToolError as e:
        report.add("base", e.message if e.path is None else f"{e.path}: {e.message}")
        return
    check_fit(adapter_obj, base, report, allow_pickle=allow_pickle)


NON_FLOAT_FIX = ("is this a quantized checkpoint whose quantization_config is missing? Use the floating-point base "
                 "the adapter was trained on")  # fmt: skip


def non_float_weight(dtype: str) -> str | None:
    """Why a base weight stored as ``dtype`` (a safetensors name) cannot take an adapter's delta, or None
    where it can (the floating-point names: F32, BF16, F8_E4M3...)."""
    if dtype_kind(dtype) == "floating-point":
        return None
    return (f"the base weight is {dtype}, not floating point: the adapter's delta would be rounded to whole "
            "numbers, most of it to nothing")  # fmt: skip


def require_float_weight(dtype: str, *, path: str | None, key: str, consequence: str = "") -> None:
    """Raise :func:`non_float_weight`'s reason, with what else it would spoil (``consequence``), if any.

    Raises:
        UnsupportedCheckpointError: naming the weight.
    """
    if (why := non_float_weight(dtype)) is not None:
        raise UnsupportedCheckpointError(why + consequence, path=path, key=key, fix=NON_FLOAT_FIX)


def check_fit(
    adapter_obj: Adapter, base: str | os.PathLike[str], report: ValidationReport, *, allow_pickle: bool = False
) -> None:
    """:func:`check_against_base` for an adapter in memory (its factors may be ``meta`` tensors)."""
    try:
        stored = open_checkpoint(base, allow_pickle=allow_pickle)
        ckpt = model_view(stored)  # packed low-bit weights under the names adapters address
        if stored.packed_layout() is None:  # a quantization loratool does not read (bitsandbytes...) refused
            stored.fp8_layout()  # by name, not module by module as shapes its packing changed
    except LoraToolError as e:
        report.add("base", e.message if e.path is None else f"{e.path}: {e.message}")
        return
    with stored:
        try:  # a diffusers or kohya file by pipeline component: the modules of the base's
            adapter_obj, left_out = diffusers.for_base(adapter_obj, ckpt)
        except LoraToolError as e:
            report.add("base", e.message + (f"; {e.fix}" if e.fix else ""))
            return
        if left_out:
            report.warnings.append(Problem("base", f"{len(left_out)} module(s) of other pipeline components not "
                                                   f"checked (first: {left_out[0]})"))  # fmt: skip
        weights = [k.removesuffix(".weight") for k in ckpt.keys() if k.endswith(".weight")]
        if adapter_obj.format == "kohya":  # kohya prefixes name modules loosely; kohya's loaders map them so
            found = resolve_paths(adapter_obj, weights)
        else:  # PEFT (and what loads PEFT files) matches a module path exactly, or loads it as nothing
            present = set(weights)
            found = {m: m for m in adapter_obj.modules if m in present}
        config = ckpt.config()
        tied = tied_output(list(ckpt.keys()), config)
        if untied_partner(adapter_obj, config):  # lazily read factors: by their shapes (merge checks the values)
            report.add(f"base/{OUTPUT_LAYER}", f"{UNTIED_WHY}; {UNTIED_FIX}")
        matched = 0
        for module, m in sorted(adapter_obj.modules.items()):
            where = f"base/{module}"
            tied_head = module not in found and tied is not None and module == tied[0]
            if tied_head and is_tied_copy(m, adapter_obj, adapter_obj.modules, config):
                matched += 1  # the tied head's LoRA is the embedding's: merged once, into the one matrix
                continue
            if m.expert is not None:
                problem = _expert_misfit(ckpt, module, m)
                if problem:
                    report.add(where, problem)
                else:
                    matched += 1
                continue
            if module not in found and tied and module == tied[0]:
                report.add(where, f"the base ties {module} to its input embedding '{tied[1]}' (one matrix): a LoRA "
                                  "on the head alone cannot be merged without changing the input embedding too; "
                                  "untie the base first, or serve the adapter unmerged")  # fmt: skip
                continue
            if module not in found:
                report.add(where, f"the base has no weight '{module}.weight': this module would adapt nothing")
                continue
            shape = tuple(ckpt.info(found[module] + ".weight").shape)
            if shape != m.weight_shape:
                report.add(where, f"the base weight is {list(shape)}, the factors imply {list(m.weight_shape)} "
                                  "(lora_B (out, r) @ lora_A (r, in)): an adapter for another model")  # fmt: skip
                continue
            if (why := non_float_weight(ckpt.info(found[module] + ".weight").dtype)) is not None:
                report.add(where, f"{why}; {NON_FLOAT_FIX}")
                continue
            matched += 1
        for key, t in sorted(adapter_obj.whole.items()):
            if key not in ckpt and tied and key == tied[0] + ".weight" and tied[1] in ckpt:
                same_shape = tuple(t.shape) == tuple(ckpt.info(tied[1]).shape)
                if same_shape and (t.device.type == "meta" or is_tied_head_unchanged(ckpt, tied, key, t)):
                    continue  # the tied head's base layer, as PEFT saves it: the embedding the base stores
            if key not in ckpt:
                report.add(f"base/{key}", "the base has no such tensor to replace (modules_to_save)")
            elif tuple(ckpt.info(key).shape) != tuple(t.shape):
                old, new = tuple(ckpt.info(key).shape), tuple(t.shape)
                if _is_vocabulary(key) and len(old) == len(new) == 2 and new[1] == old[1] and new[0] > old[0]:
                    why = f"the vocabulary grows from {old[0]} to {new[0]} rows (added tokens): resize the base's "
                    report.warnings.append(Problem(f"base/{key}", why + "embeddings to load it in PEFT"))
                    continue
                grown = "; the vocabulary sizes differ" if _is_vocabulary(key) else ""
                report.add(f"base/{key}", f"the base's is {list(old)}, the adapter's {list(new)}{grown}")
        multimodal = renamed_on_load(ckpt.config())
        if adapter_obj.modules and matched < len(adapter_obj.modules) and multimodal:
            report.add("base", f"{multimodal} is {RENAMED_WHY}")
        elif adapter_obj.modules and matched == 0:
            report.add("base", f"no module of the adapter fits {base}: it is for another model")


def _is_vocabulary(key: str) -> bool:
    """An embedding or output layer: its first dimension is the vocabulary."""
    module = key.rsplit(".", 1)[0]
    return is_embedding(module) or module == OUTPUT_LAYER


def require_valid(
    adapter: str | os.PathLike[str], refusal: str, *, check_values: bool = False, allow_pickle: bool = False
) -> list[str]:
    """Refuse what ``validate`` rejects before an operation acts on it (by default from headers and
    config only, which is cheap); ``refusal`` says what happens ("merge refuses it").

    Returns the warnings (what another reader may take differently) for the operation to pass on.

    Raises:
        MetadataError: the adapter fails validation; the message lists every problem.
    """
    report = validate_adapter(adapter, check_values=check_values, allow_pickle=allow_pickle)
    if not report.valid:
        listing = "; ".join(str(p) for p in report.problems)
        raise MetadataError(
            f"the adapter is not valid, so {refusal}: {listing}",
            path=str(adapter),
            problems=[(p.path, p.message) for p in report.problems],
            fix="run `loratool validate` on it and fix what it lists",
        )
    return [f"{adapter}: {w}" for w in report.warnings]


def _sorted(report: ValidationReport) -> ValidationReport:
    unique = sorted({(p.path, p.message) for p in report.problems})
    report.problems = [Problem(path, message) for path, message in unique]
    return report


def _check_config(directory: Path, report: ValidationReport) -> dict[str, Any] | None:
    cfg_path = directory / peft.CONFIG_NAME
    if not cfg_path.is_file():
        report.add("$", f"no {peft.CONFIG_NAME} in the adapter directory")
        return None
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        report.add("$", f"{peft.CONFIG_NAME} is not valid JSON ({e})")
        return None
    problems = check(config, "adapter_config")
    for path, message in problems:
        report.add(path, message)
    if isinstance(config, dict):
        for field, why in peft.LORA_VARIANTS.items():
            if config.get(field):
                report.add(f"$.{field}", f"{why}: loratool reads LoRA whose delta is scaling * B @ A, and DoRA")
    return config if isinstance(config, dict) and not problems else None


def _targets(config: dict[str, Any], module: str) -> bool:
    """PEFT's rule (``check_target_module_exists`` in peft.tuners.tuners_utils): ``exclude_modules``
    and ``modules_to_save`` leave a module out; then ``all-linear`` is every linear layer but the
    output layer, another string ``target_modules`` a full-match regex, and a list matches names or
    dotted suffixes, the suffix matches narrowed by ``layers_to_transform`` (the first numbered
    segment after ``layers_pattern``, or after any name, is the layer)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and _fullmatch(exclude, module):
        return False
    if isinstance(exclude, list) and _named(exclude, module):
        return False
    save = config.get("modules_to_save")
    if isinstance(save, list) and any(isinstance(m, str) and _match(rf"(^|.*\.){m}($|\..*)", module) for m in save):
        return False
    if config.get("ensure_weight_tying") is True and (
        module.rsplit(".", 1)[-1] == OUTPUT_LAYER or is_embedding(module)
    ):
        return True  # PEFT targets the tied partner of a targeted embedding or output layer too
    targets = config.get("target_modules")
    if targets is None:
        return True
    if targets == "all-linear":  # PEFT's linear and Conv1D layers, the output layer excluded
        return module.rsplit(".", 1)[-1] != OUTPUT_LAYER and not is_embedding(module)
    if isinstance(targets, str):
        return _fullmatch(targets, module)
    if not (isinstance(targets, list) and _named(targets, module)):
        return False
    if module in targets:
        return True  # named whole: PEFT narrows only the suffix matches by layer
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:  # the first numbered segment after any name, with a dot before that name (PEFT's regex)
        regexes = [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    else:
        regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in ([patterns] if isinstance(patterns, str) else patterns)
                   if isinstance(p, str)]  # fmt: skip
    found = None
    for regex in regexes:
        try:
            found = re.match(regex, module)
        except re.error:  # the schema names a pattern that does not compile
            found = None
        if found:
            break
    if found is None:
        return False
    index = int(found["idx"])
    return index == layers if isinstance(layers, int) else isinstance(layers, list) and index in layers


def _named(names: list[Any], module: str) -> bool:
    return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in names)


def _fullmatch(pattern: str, module: str) -> bool:
    return _match(pattern, module, full=True)


def _match(pattern: str, module: str, *, full: bool = False) -> bool:
    """A config's regex against a module path; one that does not compile matches nothing (the schema
    names it)."""
    try:
        return (re.fullmatch if full else re.match)(pattern, module) is not None
    except re.error:
        return False


def _check_peft_structure(ckpt: Checkpoint, config: dict[str, Any], report: ValidationReport) -> None:
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in ckpt.keys():
        if key.endswith(peft.TOKEN_ROWS_SUFFIX):
            _check_token_rows(key, ckpt.info(key).shape, config, report)
            continue
        parsed = peft.parse_key(key)
        if parsed is None:
            continue  # whole tensors (modules_to_save, base_layer) have no factor structure
        slot = parsed.factor or ("B.bias" if parsed.slot == "lora_B.bias" else parsed.slot)
        factors.setdefault(parsed.module, {})[slot] = ckpt.info(key).shape
    report.modules = len(factors)
    if not ckpt.keys():
        report.add("tensors", "holds no tensors: PEFT would load an adapter that does nothing")
    r_default = config.get("r", 8)
    ranks = config.get("rank_pattern") or {}
    for module, slots in sorted(factors.items()):
        where = f"tensors/{module}"
        if "A" not in slots or "B" not in slots:
            report.add(
                where, f"has {'lora_A' if 'A' in slots else 'lora_B'} but not {'lora_B' if 'A' in slots else 'lora_A'}"
            )
            continue
        a, b = slots["A"], slots["B"]
        if len(a) == 4 and len(b) == 4:  # Conv2d: A (r, in, kh, kw), B (out, r, 1, 1)
            if a[0] != b[1] or tuple(b[2:]) != (1, 1):
                report.add(where, f"lora_A {list(a)} and lora_B {list(b)} are not a Conv2d LoRA's (A (r, in, kh, kw), "
                                  "B (out, r, 1, 1))")  # fmt: skip
                continue
            a, b = (a[0], a[1] * a[2] * a[3]), (b[0], b[1])
        elif len(a) in (3, 5) or len(b) in (3, 5):
            report.add(where, f"{CONV_LORA_WHY} (lora_A {list(a)}, lora_B {list(b)}); {CONV_LORA_FIX}")
            continue
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            report.add(
                where, f"lora_A {list(a)} and lora_B {list(b)} do not share a rank (A is (r, in), B is (out, r))"
            )
            continue
        try:
            param = experts.wrapper_parameter(config, module) if config.get("target_parameters") else None
        except ValueError as e:
            report.add(where, str(e))
            continue
        if param is not None:  # experts x rank rows (loratool.experts)
            rank = experts.rank_of(config, param)
            if a[0] % rank:
                report.add(where, f"lora_A has {a[0]} rows: not a whole number of experts of rank {rank} ({param})")
            continue
        if a[0] == 0:
            report.add(where, f"has rank 0 (lora_A {list(a)}, lora_B {list(b)}): no factors to apply")
            continue
        if config.get("use_dora") is True and "magnitude" not in slots:
            report.add(where, "use_dora is true but the module has no lora_magnitude_vector: PEFT would start it "
                              "from the base's weight norms, not the trained ones")  # fmt: skip
        expected = pattern_lookup(ranks, module)
        expected = r_default if expected is None else expected
        if isinstance(expected, int) and a[0] != expected:
            source = "rank_pattern" if pattern_lookup(ranks, module) is not None else "r"
            report.add(
                where, f"rank {a[0]} disagrees with the config ({source} says {expected}): PEFT would fail to load it"
            )
        if not _targets(config, module):
            report.add(
                where,
                "has LoRA weights but target_modules does not select this module (as PEFT reads it, with "
                "exclude_modules, modules_to_save and layers_to_transform): PEFT would not load them",
            )
        if "B.bias" in slots and not config.get("lora_bias", False):
            report.add(where, "has lora_B.bias but lora_bias is not true in the config")


def _expert_misfit(ckpt: Checkpoint, module: str, m: LoraModule) -> str | None:
    """Why expert ``m`` (``<parameter>.<e>``) does not fit the base, or None: the base must store
    the parameter as one (E, out, in) or (E, in, out) tensor, or the experts apart as transformers
    fuses them (:func:`loratool.experts.apart_weights`; merge's rule)."""
    key = module.rpartition(".")[0]
    if key not in ckpt:
        assert m.expert is not None
        transposed = ckpt.config().get("model_type") in experts.TRANSPOSED_EXPERT_MODEL_TYPES
        apart = experts.apart_weights(key, m.expert[0], ckpt.shape_of, transposed_model=transposed)
        if apart is None:
            return f"the base stores the experts parameter '{key}' neither as one tensor nor per expert"
        if experts.split_apart(m, [s for _, s in apart]) is None:
            shapes = ", ".join(f"{k} {list(s)}" for k, s in apart)
            return f"the base's per-expert weights ({shapes}) do not make up {[m.out_features, m.in_features]}"
        whys = [(k, why) for k, _ in apart if (why := non_float_weight(ckpt.info(k).dtype)) is not None]
        return f"{whys[0][0]}: {whys[0][1]}; {NON_FLOAT_FIX}" if whys else None
    shape = tuple(ckpt.info(key).shape)
    if experts.stored_kind(shape, m, transposed_model=False) is None:
        count, out_in = m.expert[1] if m.expert else 1, [m.out_features, m.in_features]
        return f"the base's '{key}' is {list(shape)}; {count} experts of {out_in} (out, in) do not fit"
    why = non_float_weight(ckpt.info(key).dtype)
    return None if why is None else f"{why}; {NON_FLOAT_FIX}"


def _check_token_rows(key: str, shape: tuple[int, ...], config: dict[str, Any], report: ValidationReport) -> None:
    """PEFT's trainable tokens: one row per index ``trainable_token_indices`` names for the module."""
    spec = peft.token_indices(config, peft.strip_prefix(key)[: -len(peft.TOKEN_ROWS_SUFFIX)])
    if spec is None:
        report.add(f"tensors/{key}", "trainable tokens, but trainable_token_indices names no rows for this module")
    elif len(shape) != 2 or shape[0] != len(spec):
        report.add(f"tensors/{key}", f"{list(shape)}: trainable_token_indices names {len(spec)} rows")


def _validate_mlx(directory: Path, report: ValidationReport, check_values: bool) -> ValidationReport:
    """An mlx-lm adapter: its config against the schema, and every tensor against what mlx-lm's
    ``load_adapters`` would build (one rank for all, only the modules ``keys`` selects)."""
    config = json.loads((directory / mlx.CONFIG_NAME).read_text())
    for path, message in check(config, "mlx_adapter_config"):
        report.add(path, message)
    weights = directory / mlx.WEIGHTS_NAME
    if not weights.is_file():
        report.add("tensors", f"no {mlx.WEIGHTS_NAME} in the adapter directory")
        return report
    params = config.get("lora_parameters") if isinstance(config.get("lora_parameters"), dict) else {}
    rank, keys = params.get("rank"), params.get("keys")
    try:
        ckpt = open_checkpoint(weights)
    except LoraToolError as e:
        report.add("tensors", e.message)
        return report
    with ckpt:
        slots: dict[str, dict[str, tuple[int, ...]]] = {}
        for key in ckpt.keys():
            module, _, slot = key.rpartition(".")
            if slot not in mlx.SLOTS or not module:
                report.add(f"tensors/{key}", "not an mlx-lm adapter tensor (<module>.lora_a, .lora_b, .m)")
                continue
            slots.setdefault(module, {})[slot] = ckpt.info(key).shape
        report.modules = len(slots)
        for module, s in sorted(slots.items()):
            where = f"tensors/{module}"
            a, b = s.get("lora_a"), s.get("lora_b")
            if a is None or b is None:
                report.add(where, "needs both lora_a and lora_b")
            elif len(a) != 2 or len(b) != 2 or a[1] != b[0]:
                report.add(where, f"lora_a {list(a)} and lora_b {list(b)} do not share a rank (lora_a is (in, r))")
            elif isinstance(rank, int) and a[1] != rank:
                report.add(where, f"rank {a[1]} disagrees with lora_parameters.rank {rank}: mlx-lm would refuse it")
            if isinstance(keys, list) and not _mlx_selects(keys, module):
                report.add(where, "lora_parameters.keys does not select this module: mlx-lm would refuse the file")
        _check_dtypes(ckpt, report)
        _check_provenance(ckpt, report, check_values)
    return report


def _mlx_selects(keys: list[Any], module: str) -> bool:
    """mlx-lm matches ``keys`` against full module paths and against paths inside a block."""
    inside = re.sub(r"^.*?\blayers\.\d+\.", "", module)
    return module in keys or inside in keys


def _check_diffusers_structure(ckpt: Checkpoint, report: ValidationReport) -> None:
    """A diffusers LoRA file: each component's LoraConfig (the header's) against the schema, and
    its factors as PEFT's under that config."""
    try:
        configs = diffusers.component_configs(ckpt.header_metadata, ckpt.path)
    except LoraToolError as e:
        report.add(f"metadata/{diffusers.METADATA_KEY}", e.message)
        return
    for key in diffusers.stray_metadata_keys(ckpt.header_metadata, ckpt.path):
        report.warnings.append(Problem(
            f"metadata/{key}", "names no pipeline component (keys are <component>.<field>, e.g. unet.lora_alpha): "
            "diffusers does not apply it, and neither does loratool"))  # fmt: skip
    for component, config in sorted(configs.items()):
        for path, message in check(config, "adapter_config"):
            report.add(f"metadata/{component}{path.removeprefix('$')}", message)
    if any(diffusers.type_problems(c) for c in configs.values()):
        return  # the factors are read through the configs (as a reader reads them): not while those are invalid
    try:
        report.modules = len(diffusers.read_diffusers(ckpt.path, lazy=True).modules)
    except LoraToolError as e:
        report.add(f"tensors/{e.key}" if e.key else "tensors", e.message)


def _check_kohya_structure(ckpt: Checkpoint, report: ValidationReport) -> None:
    from .formats.lycoris import LYCORIS_FIX, LYCORIS_WHAT, is_lycoris

    if is_lycoris(list(ckpt.keys())):
        report.add("tensors", f"{LYCORIS_WHAT}; {LYCORIS_FIX}")
        return
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in ckpt.keys():
        parsed = kohya.parse_key(key)
        if parsed is None:
            report.add(f"tensors/{key}", "not a kohya key (<prefix>.lora_down.weight, .lora_up.weight, .alpha)")
            continue
        groups.setdefault(parsed.prefix, {})[parsed.slot] = ckpt.info(key).shape
    report.modules = len(groups)
    for prefix, slots in sorted(groups.items()):
        down, up = slots.get("lora_down.weight"), slots.get("lora_up.weight")
        if down is not None and up is not None and len(down) == len(up) == 4:  # LoCon: (r, in, kh, kw), (out, r, 1, 1)
            if tuple(up[2:]) != (1, 1):
                report.add(f"tensors/{prefix}", f"lora_up {list(up)} is not a conv module's (out, r, 1, 1)")
                continue
            down, up = (down[0], down[1] * down[2] * down[3]), (up[0], up[1])
        elif (down is not None and len(down) != 2) or (up is not None and len(up) != 2):
            report.add(f"tensors/{prefix}", f"{CONV_LORA_WHY}; {CONV_LORA_FIX}")
            continue
        if down is None or up is None:
            report.add(f"tensors/{prefix}", "needs both lora_down.weight and lora_up.weight")
        elif down[0] != up[1]:
            report.add(f"tensors/{prefix}", f"lora_down {list(down)} and lora_up {list(up)} disagree on the rank")
        if "alpha" in slots and slots["alpha"] not in ((), (1,)):
            report.add(f"tensors/{prefix}.alpha", f"alpha must be a scalar (got shape {list(slots['alpha'])})")
        elif "alpha" not in slots and down is not None:
            _check_missing_alpha(prefix, down[0], ckpt.header_metadata.get("ss_network_alpha"), report)


def _check_missing_alpha(prefix: str, rank: int, recorded: str | None, report: ValidationReport) -> None:
    """A kohya module without ``.alpha`` is scaled by alpha = r (scaling 1) by kohya's loader; when the
    header records another network alpha, which one was meant cannot be told."""
    try:
        header_alpha = float(recorded) if recorded is not None else None
    except ValueError:
        header_alpha = None  # "Dynamic" or text: no single alpha is claimed
    where = f"tensors/{prefix}.alpha"
    if header_alpha is not None and header_alpha != rank:
        report.add(
            where,
            f"is missing, and the header's ss_network_alpha is {recorded}: kohya's loader would scale by "
            f"alpha = r = {rank} (scaling 1), the header says {header_alpha / rank:g}; add the alpha tensor",
        )
    else:
        report.warnings.append(Problem(where, f"is missing: scaled by alpha = r = {rank} (scaling 1), as kohya does"))


def _check_dtypes(ckpt: Checkpoint, report: ValidationReport) -> None:
    for info in ckpt.infos():
        if info.dtype not in FLOAT_DTYPES:
            report.add(
                f"tensors/{info.name}",
                f"dtype {info.dtype} cannot hold an adapter's factors ({', '.join(FLOAT_DTYPES)} can)",
            )


def _check_provenance(ckpt: Checkpoint, report: ValidationReport, check_values: bool) -> None:
    record = decode(ckpt.header_metadata)
    if record is not None:
        if "_invalid_json" in record:
            report.add(f"header/{PROVENANCE_KEY}", "is not valid JSON")
            record = None
        else:
            for path, message in check(record, "provenance"):
                report.add(f"header/{PROVENANCE_KEY}{path[1:]}", message)
    if not check_values:
        return
    from .math.linalg import is_finite  # float8 too, which has no isfinite

    for key in ckpt.keys():
        if not is_finite(ckpt.get(key)):
            report.add(f"tensors/{key}", "holds NaN or Inf")
    if record is not None and "tensors_sha256" in record:
        digest = tensors_sha256(ckpt.keys(), ckpt.get)
        report.sha256_checked = True
        if digest != record["tensors_sha256"]:
            report.add(
                f"header/{PROVENANCE_KEY}.tensors_sha256",
                "does not match the tensors: the file was changed after loratool wrote it",
            )
