"""diffusers' LoRA files (``pytorch_lora_weights.safetensors``): PEFT's factors keyed by pipeline
component, ``unet.<module>.lora_A.weight``, ``transformer.<...>``, ``text_encoder.<...>``, and the
components' ``LoraConfig`` in the header under ``lora_adapter_metadata`` (``"unet.r"``,
``"unet.lora_alpha"``, ...). Without it diffusers scales every module by 1 (alpha = rank), and so
does loratool.

loratool keeps the component in the module path (``unet.down_blocks.0...``); an adapter meets a
component's checkpoint (``PIPE/unet``) through :func:`for_component`, which keeps that component's
modules under their paths in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import BASE_REWRITING_INITS, Adapter, LoraModule
from ..errors import InputFileError, MetadataError, UnsupportedAdapterError
from ..io.atomic import atomic_output
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.writer import save_tensors
from ..metadata.provenance import with_tensors_digest
from ..metadata.schema import check
from . import peft
from .output import require_finite_output

if TYPE_CHECKING:
    import torch

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
METADATA_KEY = "lora_adapter_metadata"
# a component checkpoint's _class_name -> its place in a pipeline, where its folder name does not say
_CLASS_COMPONENT = {"UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder",
                    "CLIPTextModelWithProjection": "text_encoder_2", "T5EncoderModel": "text_encoder_3"}  # fmt: skip


def split_component(key: str) -> tuple[str, str] | None:
    """(component, the rest) of a diffusers LoRA key, or None."""
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS and rest else None


def is_diffusers(keys: Iterable[str]) -> bool:
    """Every key a PEFT factor under a pipeline component (``unet.<module>.lora_A.weight``)."""
    keys = list(keys)
    return bool(keys) and all(
        (sc := split_component(k)) is not None and peft.parse_key(sc[1]) is not None for k in keys
    )


def component_configs(metadata: Mapping[str, str], file: Path) -> dict[str, dict[str, Any]]:
    """Each component's LoraConfig fields from the header (empty where diffusers wrote none): its
    ``<component>.<field>`` keys. Other keys (:func:`stray_metadata_keys`) are left out, as diffusers'
    loader leaves out every key without the prefix of the component it loads."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in _flat_metadata(metadata, file).items():
        component, dot, field = key.partition(".")
        if dot and component in COMPONENTS:
            out.setdefault(component, {})[field] = value
    return out


def stray_metadata_keys(metadata: Mapping[str, str], file: Path) -> list[str]:
    """The header's LoraConfig keys that name no pipeline component, which no reader applies."""
    return [k for k in _flat_metadata(metadata, file) if (k.partition(".")[0] not in COMPONENTS or "." not in k)]


def _flat_metadata(metadata: Mapping[str, str], file: Path) -> dict[str, Any]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{METADATA_KEY} in the header is not JSON ({e})", path=str(file)) from None
    if not isinstance(flat, dict):
        raise MetadataError(f"{METADATA_KEY} in the header is not a JSON object", path=str(file))
    return {str(k): v for k, v in flat.items()}


def type_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A component's LoraConfig against the schema as a reader needs it: its fields' types (validate
    also wants peft_type, which a reader does without)."""
    return check({"peft_type": "LORA", **config}, "adapter_config")


def _require_typed(configs: Mapping[str, Mapping[str, Any]], file: Path) -> None:
    """Each component's LoraConfig fields of the types the schema gives them, before any is read."""
    for component, config in configs.items():
        problems = type_problems(config)
        if problems:
            raise MetadataError(
                f"the {component} LoraConfig in {METADATA_KEY} is not valid: "
                + "; ".join(f"{at}: {message}" for at, message in problems),
                path=str(file), problems=problems, fix="correct those fields (`loratool validate` checks the file)",
            )  # fmt: skip


def _merge_fields(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The components' LoraConfig fields that decide whether the adapter is a weight delta at all, raised to
    the adapter's config, where merge and the runtime checks look for them as in a PEFT directory: a
    base-rewriting init (PiSSA, OLoRA...), an Activated LoRA's invocation tokens, layer_replication."""
    out: dict[str, Any] = {}
    for cfg in configs.values():
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            out.setdefault("init_lora_weights", init)
        for field in ("alora_invocation_tokens", "layer_replication"):
            if cfg.get(field):
                out.setdefault(field, cfg[field])
    return out


def read_diffusers(file: Path, *, lazy: bool = False) -> Adapter:
    """Read a diffusers LoRA file: modules under ``<component>.<module path>``."""
    slots: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with open_checkpoint(file) as ckpt:
        metadata = ckpt.header_metadata
        for key in ckpt.keys():
            sc = split_component(key)
            parsed = peft.parse_key(sc[1]) if sc else None
            if sc is None or parsed is None:
                raise InputFileError(f"'{key}' is not a diffusers LoRA key (<component>.<module>.lora_A.weight)",
                                     path=str(file))  # fmt: skip
            slots.setdefault((sc[0], parsed.module), {})[parsed.slot] = ckpt.get_meta(key) if lazy else ckpt.get(key)
    configs = component_configs(metadata, file)
    _require_typed(configs, file)
    for component, cfg in configs.items():  # what a PEFT directory's reader refuses, a component's too
        variant = next((f for f in peft.LORA_VARIANTS if cfg.get(f)), None)
        if variant is not None:
            raise UnsupportedAdapterError(
                f"{component}.{variant} is set: {peft.LORA_VARIANTS[variant]}; loratool reads LoRA whose delta is "
                "scaling * B @ A, and DoRA", path=str(file), fix="merge it with PEFT where PEFT can, or serve it so",
            )  # fmt: skip
    modules = {}
    for (component, path), s in slots.items():
        config = configs.get(component)
        module = peft.module_from_slots(path, s, config or {}, bool((config or {}).get("use_rslora")), False, file)
        if config is None:  # no LoraConfig written: diffusers scales every module by 1
            module.alpha = float(module.rank)
        modules[f"{component}.{path}"] = module
    config = {"peft_type": "LORA", "components": {c: configs.get(c, {}) for c, _ in slots}, **_merge_fields(configs)}
    return Adapter(modules=modules, config=config, metadata=metadata, format="diffusers", path=str(file))


def for_base(adapter: Adapter, ckpt: Checkpoint) -> tuple[Adapter, list[str]]:
    """The modules of ``adapter`` for the checkpoint it meets, and those left out: of a diffusers LoRA
    file or a kohya file, the modules of the pipeline component ``ckpt`` is (:func:`for_component`,
    :func:`kohya_for_component`); any other adapter as it is."""
    if adapter.format not in ("diffusers", "kohya"):
        return adapter, []
    config = ckpt.config()
    component = component_of(ckpt.root, config)
    if adapter.format == "diffusers":
        return for_component(adapter, component, str(ckpt.path))
    if component is None:  # a kohya file for a language model: matched by its prefixes as ever
        return adapter, []
    shapes = {k.removesuffix(".weight"): ckpt.info(k).shape for k in ckpt.keys() if k.endswith(".weight")}
    return kohya_for_component(adapter, component, shapes, config)


def each_for_base(loaded: list[tuple[Adapter, float, str]], ckpt: Checkpoint, warnings: list[str],
                  then: str = "") -> list[tuple[Adapter, float, str]]:  # fmt: skip
    """(adapter, scale, name) triples through :func:`for_base`: diffusers and kohya files cut to the component
    ``ckpt`` is (``PIPE/unet``), what they hold for other components left out and said in ``warnings``
    (with ``then``, what to do about them)."""
    out = []
    for adapter, scale, name in loaded:
        adapter, left_out = for_base(adapter, ckpt)
        if left_out:
            warnings.append(f"{name}: {len(left_out)} module(s) of other pipeline components left out (first: "
                            f"{left_out[0]}){then}")  # fmt: skip
        out.append((adapter, scale, name))
    return out


def for_component(adapter: Adapter, component: str | None, where: str) -> tuple[Adapter, list[str]]:
    """The modules of ``adapter`` (a diffusers LoRA file) for ``component``'s checkpoint, under their
    paths in it, and the other components' modules left out. Refuses a base that is no pipeline
    component, or one the file has nothing for."""
    import dataclasses

    components = sorted({p.partition(".")[0] for p in adapter.modules})
    if component is None:
        raise InputFileError(
            f"a diffusers LoRA file holds modules by pipeline component ({', '.join(components)}), and {where} is not "
            "a pipeline component's folder", path=adapter.path,
            fix=f"give the component's folder of the pipeline, e.g. PIPELINE/{components[0]}",
        )  # fmt: skip
    mine = {p[len(component) + 1 :]: m for p, m in adapter.modules.items() if p.startswith(component + ".")}
    if not mine:
        raise InputFileError(
            f"the diffusers LoRA file has no modules for the {component} ({', '.join(components)} only)",
            path=adapter.path, fix=f"give PIPELINE/{components[0]} as the base",
        )  # fmt: skip
    left_out = sorted(p for p in adapter.modules if not p.startswith(component + "."))
    return dataclasses.replace(adapter, modules=mine, format="peft"), left_out


# kohya's names for the modules of each pipeline component (sd-scripts: lora_unet_<path>, lora_te_<path>,
# SDXL's second text encoder lora_te2_<path>); with a diffusers-layout model's paths underscored
_KOHYA_PREFIXES = {"unet": ("lora_unet_",), "transformer": ("lora_unet_", "lora_transformer_"),
                   "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}  # fmt: skip
KOHYA_LAYOUT_WHY = (
    "kohya names in an original model's layout are mapped to diffusers' module paths for SDXL's UNet and Flux's "
    "transformer only, each into its own component's folder"
)


def kohya_for_component(
    adapter: Adapter,
    component: str | None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[Adapter, list[str]]:
    """A kohya file's modules for one pipeline component's checkpoint (``lora_unet_...`` for the
    UNet, ``lora_te_...`` for the text encoder), and those of other components left out. A file
    with no component prefixes (a language model's) is returned as it is. Names in an original
    model's layout are renamed to the base's module paths (``shapes``: path -> weight shape):
    SDXL's UNet (``input_blocks``) by :func:`sgm_names` where its ``config`` allows, Flux's
    transformer (``double_blocks``) by :func:`flux_modules`, fused q/k/v split exactly."""
    import dataclasses

    known = tuple(p for ps in _KOHYA_PREFIXES.values() for p in ps)
    if component is None or not any(p.startswith(known) for p in adapter.modules):
        return adapter, []
    mine = _KOHYA_PREFIXES.get(component, ())
    kept = {p: m for p, m in adapter.modules.items() if p.startswith(mine)}
    if not kept:
        raise InputFileError(
            f"the kohya file has no modules for the {component} (its names start "
            f"{', '.join(sorted({p.split('_')[1] for p in adapter.modules}))})", path=adapter.path,
            fix="give the folder of the component it is for, e.g. PIPELINE/unet for lora_unet_ names",
        )  # fmt: skip
    left_out = sorted(set(adapter.modules) - set(kept))
    if component == "unet" and config is not None and shapes and any(_SGM.search(p) for p in kept):
        table = {"lora_unet_" + sgm.replace(".", "_"): path for sgm, path in sgm_names(shapes, config).items()}
        kept = {table.get(p, p): m for p, m in kept.items()}
    if component == "transformer" and shapes and any(p.startswith(_FLUX_BLOCKS) for p in kept):
        kept = flux_modules(kept, shapes, adapter.path)
    return dataclasses.replace(adapter, modules=kept), left_out


_FLUX_BLOCKS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")
# kohya's (sd-scripts') name of a Flux module, after lora_unet_ -> diffusers' FluxTransformer2DModel path(s),
# read from diffusers' _convert_sd_scripts_to_ai_toolkit; {i}: the block. Several paths: the fused rows, in order.
_FLUX_NAMES = {
    "double_blocks_{i}_img_attn_proj": ["transformer_blocks.{i}.attn.to_out.0"],
    "double_blocks_{i}_img_attn_qkv": ["transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                       "transformer_blocks.{i}.attn.to_v"],
    "double_blocks_{i}_img_mlp_0": ["transformer_blocks.{i}.ff.net.0.proj"],
    "double_blocks_{i}_img_mlp_2": ["transformer_blocks.{i}.ff.net.2"],
    "double_blocks_{i}_img_mod_lin": ["transformer_blocks.{i}.norm1.linear"],
    "double_blocks_{i}_txt_attn_proj": ["transformer_blocks.{i}.attn.to_add_out"],
    "double_blocks_{i}_txt_attn_qkv": ["transformer_blocks.{i}.attn.add_q_proj",
                                       "transformer_blocks.{i}.attn.add_k_proj",
                                       "transformer_blocks.{i}.attn.add_v_proj"],
    "double_blocks_{i}_txt_mlp_0": ["transformer_blocks.{i}.ff_context.net.0.proj"],
    "double_blocks_{i}_txt_mlp_2": ["transformer_blocks.{i}.ff_context.net.2"],
    "double_blocks_{i}_txt_mod_lin": ["transformer_blocks.{i}.norm1_context.linear"],
    "single_blocks_{i}_linear1": ["single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                  "single_transformer_blocks.{i}.attn.to_v", "single_transformer_blocks.{i}.proj_mlp"],
    "single_blocks_{i}_linear2": ["single_transformer_blocks.{i}.proj_out"],
    "single_blocks_{i}_modulation_lin": ["single_transformer_blocks.{i}.norm.linear"],
    "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
    "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in_out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in_in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in_out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in_in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in_out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer_linear": ["proj_out"],
    "final_layer_adaLN_modulation_1": ["norm_out.linear"],  # its rows (shift, scale) are diffusers' (scale, shift)
}  # fmt: skip


def flux_modules(modules: Mapping[str, LoraModule], shapes: Mapping[str, tuple[int, ...]], where: str | None
                 ) -> dict[str, LoraModule]:  # fmt: skip
    """kohya's Flux modules (the original model's layout) as diffusers' FluxTransformer2DModel holds
    them: renamed, a fused projection (q, k, v; q, k, v and the MLP of a single block) split into its
    parts by their rows (each keeps the shared A: exact), and the final modulation's rows swapped."""
    import dataclasses

    import torch

    from ..runtimes.transforms import split_module

    patterns = [(re.compile("^lora_unet_" + k.replace("{i}", r"(\d+)") + "$"), v) for k, v in _FLUX_NAMES.items()]
    out: dict[str, LoraModule] = {}
    for name, m in modules.items():
        found = next(((hit, targets) for pattern, targets in patterns if (hit := pattern.match(name))), None)
        if found is None:
            out[name] = m  # refused by name where the merge or check matches paths
            continue
        hit, targets = found
        paths = [t.replace("{i}", hit[1]) if hit.groups() else t for t in targets]
        missing = [p for p in paths if p not in shapes]
        if missing:
            raise InputFileError(
                f"the kohya module '{name}' is Flux's {', '.join(paths)}, which the base does not have ({missing[0]})",
                path=where, fix="give the Flux transformer it was trained for",
            )  # fmt: skip
        if paths == ["norm_out.linear"] and not m.lora_B.is_meta:  # (a lazy read's factors hold no rows to swap,
            shift, scale = m.lora_B.chunk(2, dim=0)  # and concatenating them makes torch import its symbolic shapes)
            m = dataclasses.replace(m, lora_B=torch.cat([scale, shift]))
        sizes = [shapes[p][0] for p in paths]
        if len(paths) > 1 and m.out_features != sum(sizes):  # (one path: merge and validate check its shape)
            raise InputFileError(
                f"the kohya module '{name}' has {m.out_features} output rows, but Flux's {', '.join(paths)} in the "
                f"base have {' + '.join(map(str, sizes))} = {sum(sizes)}", path=where,
                fix="give the Flux transformer it was trained for, or check the file",
            )  # fmt: skip
        parts = [m] if len(paths) == 1 else split_module(m, sizes)
        out.update(zip(paths, parts))
    return out


_SGM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")
_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}  # fmt: skip
_FIXED = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def sgm_names(paths: Iterable[str], config: Mapping[str, Any]) -> dict[str, str]:
    """The original (SGM/LDM) UNet's name of each diffusers UNet module path, as kohya names SDXL's
    modules: ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (with two
    layers per block). Read from diffusers' own conversion (``_maybe_map_sgm_blocks_to_diffusers``
    and ``_convert_unet_lora_key``) and run backwards; checked against it in tests/test_diffusion.py.
    Empty where the config's ``layers_per_block`` is not one number."""
    per = config.get("layers_per_block")
    if not isinstance(per, int):
        return {}
    n = per + 1  # an input block per layer and a downsampler; an output block per layer and one more
    with_attention = ["CrossAttn" in str(k) for k in config.get("up_block_types") or []]

    def resnet(rest: str) -> str:
        return _RESNET.get(rest, rest)

    out = {}
    for path in paths:
        sgm = _FIXED.get(path)
        if sgm is None and (m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)):
            b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            sgm = f"input_blocks.{1 + b * n + layer}." + ("0." + resnet(rest) if kind == "resnets" else "1." + rest)
        elif sgm is None and (m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)):
            sgm = f"input_blocks.{(int(m[1]) + 1) * n}.0.op"
        elif sgm is None and (m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", path)):
            index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get((m[1], m[2]))
            if index is not None:
                sgm = f"middle_block.{index}." + (resnet(m[3]) if m[1] == "resnets" else m[3])
        elif sgm is None and (m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)):
            b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            sgm = f"output_blocks.{b * n + layer}." + ("0." + resnet(rest) if kind == "resnets" else "1." + rest)
        elif sgm is None and (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)):
            b = int(m[1])
            inner = 2 if b < len(with_attention) and with_attention[b] else 1
            sgm = f"output_blocks.{b * n + per}.{inner}.conv"
        if sgm is not None:
            out[sgm] = path
    return out


def component_of(root: Path, config: Mapping[str, Any]) -> str | None:
    """The pipeline component a checkpoint folder is (``PIPE/unet`` -> ``unet``), or None."""
    folder = root if root.is_dir() else root.parent
    if folder.name in COMPONENTS and ("_diffusers_version" in config or (folder.parent / "model_index.json").is_file()):
        return folder.name
    name = str(config.get("_class_name", ""))
    if name in _CLASS_COMPONENT:
        return _CLASS_COMPONENT[name]
    return "transformer" if name.endswith("Transformer2DModel") else None


def write_diffusers(adapter: Adapter, out: Path, *, force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``adapter`` (module paths under their component) as one diffusers LoRA file, with each
    component's LoraConfig in the header so that diffusers rebuilds every rank and scaling."""

    from ..adapter import conv_file_factors

    if adapter.whole or adapter.token_rows:
        raise InputFileError("diffusers LoRA files hold LoRA factors only", fix="leave out --keep-full, or write PEFT")
    by_component: dict[str, dict[str, Any]] = {}
    for path, m in adapter.modules.items():
        sc = split_component(path)
        if sc is None:
            raise InputFileError(f"module '{path}' names no pipeline component ({', '.join(COMPONENTS)})",
                                 fix="write PEFT, or extract from a pipeline component's folder")  # fmt: skip
        if m.expert is not None or m.magnitude is not None:
            raise InputFileError(f"'{path}': diffusers LoRA files have no expert or DoRA layout", fix="write PEFT")
        by_component.setdefault(sc[0], {})[sc[1]] = m
    tensors: dict[str, torch.Tensor] = {}
    flat: dict[str, Any] = {}
    for component, modules in by_component.items():
        for path, m in modules.items():
            a, b = conv_file_factors(m) if m.kernel is not None else (m.lora_A, m.lora_B)
            for slot, t in (("lora_A.weight", a), ("lora_B.weight", b), ("lora_B.bias", m.bias)):
                if t is not None:
                    t = t.detach().cpu()
                    tensors[f"{component}.{path}.{slot}"] = (t.to(dtype) if dtype is not None else t).contiguous()
        config = peft.build_config(Adapter(modules=modules, config=peft.new_config(base_model_name_or_path=None,
                                                                                  task_type=None)))  # fmt: skip
        flat.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(flat, sort_keys=True, allow_nan=False)}
    metadata.update({k: v for k, v in adapter.metadata.items() if k.startswith("loratool")})
    require_finite_output(tensors, out)
    metadata = with_tensors_digest(metadata, tensors)
    with atomic_output(out, force=force, directory=False) as tmp:
        save_tensors(tmp, tensors, metadata)
    return out
