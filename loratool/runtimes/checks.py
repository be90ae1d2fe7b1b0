"""What each serving runtime can take: ``validate --runtime vllm|llama.cpp|mlx|peft``.

Each rule comes from the runtime's own loader, read at the source:

- vLLM (``vllm/lora/peft_helper.py``, ``vllm/config/lora.py``): a PEFT directory; no
  ``modules_to_save`` (other than a classifier's ``classifier``/``score``), no DoRA, no
  ``lora_bias`` and ``bias = "none"``, no base-rewriting init (PiSSA, OLoRA, CorDA, LoftQ), no aLoRA,
  ``layer_replication``, BD-LoRA or QALoRA; every rank at most the server's ``--max-lora-rank`` (one
  of 1, 8, 16, 32, 64, 128, 256, 320, 512; 16 unless set). Releases before 2026 read only ``r`` and
  ``lora_alpha``: one scaling for every module, ``rank_pattern``/``alpha_pattern`` ignored;
- llama.cpp: its own GGUF adapters, for the architectures and tensors :mod:`loratool.runtimes.gguf`
  maps (which needs the base's ``config.json``);
- mlx-lm: its own directory layout, one rank and scale, no whole tensors or bias;
- PEFT: PEFT directories (what ``validate`` checks without ``--runtime``).

Every problem carries its fix, most often a ``loratool convert`` command.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from ..adapter import Adapter, lora_scaling
from ..arch import is_vision_module
from ..errors import Refusal

Runtime = Literal["peft", "vllm", "llama.cpp", "mlx"]
RUNTIMES: tuple[Runtime, ...] = ("peft", "vllm", "llama.cpp", "mlx")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_DEFAULT_MAX_LORA_RANK = 16
_VLLM_UNSUPPORTED_FIELDS = {
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QALoRA",
}
_MERGE = "merge the adapter into the base (loratool merge) and serve the merged model"


def runtime_refusals(
    adapter: Adapter,
    runtime: Runtime,
    *,
    source: str,
    base: str | None = None,
    base_config: Mapping[str, Any] | None = None,
) -> tuple[list[Refusal], list[str]]:
    """(problems, notes) for serving ``adapter`` (read from ``source``) with ``runtime``.

    ``adapter`` may be read lazily (headers only); ``base_config`` is the ``config.json`` of the
    checkpoint ``base``, needed for llama.cpp.
    """
    if runtime == "vllm":
        return _vllm(adapter, source), _vllm_notes(adapter)
    if runtime == "llama.cpp":
        return _copies_dropped(*_llama_cpp(adapter, source, base, base_config), adapter, source, base, runtime)
    if runtime == "mlx":
        return _copies_dropped(*_mlx(adapter, source, base, base_config), adapter, source, base, runtime)
    return _peft(adapter, source), []


def _copies_dropped(problems: list[Refusal], notes: list[str], adapter: Adapter, source: str, base: str | None,
                    runtime: str) -> tuple[list[Refusal], list[str]]:  # fmt: skip
    """A whole tensor equal to the base's is no problem where convert leaves it out (it does, given
    the base): a note instead, as convert says it."""
    whole = [p for p in problems if p.where in adapter.whole]
    if base is None or not whole:
        return problems, notes
    from ..formats import load_adapter
    from .transforms import unchanged_whole

    same = set(unchanged_whole(load_adapter(source), base))  # read whole: the comparison needs the values
    if not same:
        return problems, notes
    kept = [p for p in problems if p.where not in same]
    return kept, [*notes, f"{runtime}: {len(same)} whole tensor(s) equal to the base's ({', '.join(sorted(same))}) "
                          f"are left out by convert --base (PEFT saves targeted embeddings whole)"]  # fmt: skip


def _convert(source: str, to: str, extra: str = "") -> str:
    out = source.rstrip("/").removesuffix(".safetensors") + {"peft": "-peft", "mlx": "-mlx", "gguf": ".gguf"}[to]
    return f"loratool convert {source} --to {to}{extra} -o {out}"


def _vllm(adapter: Adapter, source: str) -> list[Refusal]:
    out: list[Refusal] = []
    config = adapter.config
    if adapter.format != "peft":
        out.append(Refusal("format", f"vLLM reads PEFT adapter directories, not {adapter.format} files",
                           _convert(source, "peft", " --portable")))  # fmt: skip
    saved = sorted({k.rsplit(".", 1)[0] for k in adapter.whole})
    if [m for m in saved if m.rsplit(".", 1)[-1] not in ("classifier", "score")]:
        out.append(Refusal("modules_to_save", f"vLLM takes no whole tensors ({', '.join(saved)})", _MERGE))
    if adapter.use_dora:
        out.append(Refusal("use_dora", "vLLM has no DoRA", _MERGE))
    vision = sorted(p for p in adapter.modules if is_vision_module(p))
    if vision:
        out.append(Refusal(vision[0], f"vLLM applies LoRA to the language model only, not to vision towers or "
                           f"projectors (vLLM issues #23796, #27916): {len(vision)} module(s) would be ignored",
                           "merge the adapter, or train it on the language model's modules alone"))  # fmt: skip
    conv = sorted(p for p, m in adapter.modules.items() if m.kind == "conv2d")
    if conv:
        out.append(Refusal(conv[0], f"vLLM's LoRA layers are linear: {len(conv)} Conv2d module(s)", _MERGE))
    biased = [p for p, m in adapter.modules.items() if m.bias is not None]
    if biased or config.get("lora_bias"):
        out.append(Refusal("lora_bias", f"vLLM has no LoRA bias ({len(biased)} module(s) carry one)", _MERGE))
    if config.get("bias", "none") != "none":
        out.append(Refusal("bias", f"vLLM takes bias = 'none' only, not {config.get('bias')!r}", _MERGE))
    if adapter.rewrites_base:
        init = config.get("init_lora_weights")
        out.append(Refusal(
            "init_lora_weights", f"init_lora_weights={init!r} rewrites the base weights when PEFT loads the "
            "adapter; vLLM serves the base as it is",
            "convert it to a plain LoRA with PEFT (path_initial_model_for_weight_conversion)",
        ))  # fmt: skip
    out += [
        Refusal(key, f"vLLM does not support {what}", _MERGE)
        for key, what in _VLLM_UNSUPPORTED_FIELDS.items()
        if config.get(key)
    ]
    top = max((m.rank for m in adapter.modules.values()), default=0)
    if top > VLLM_MAX_LORA_RANKS[-1]:
        out.append(Refusal("r", f"rank {top} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})",
                           f"loratool resize {source} -r {VLLM_MAX_LORA_RANKS[-1]} -o OUT"))  # fmt: skip
    misscaled = _one_scaling_misses(adapter)
    if misscaled:
        out.append(Refusal(
            "lora_alpha", f"{len(misscaled)} module(s) (first: {misscaled[0]}) scale otherwise than r and lora_alpha "
            "say; vLLM releases that read only those two apply one scaling to every module",
            _convert(source, "peft", " --portable"),
        ))  # fmt: skip
    return out


def _one_scaling_misses(adapter: Adapter) -> list[str]:
    """Modules whose true scaling is not the one ``r`` and ``lora_alpha`` alone give."""
    config = adapter.config
    alpha, r = config.get("lora_alpha"), config.get("r")
    if not isinstance(alpha, (int, float)) or not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return []  # no PEFT r and lora_alpha (a kohya file, say): the format problem says what to do
    one = lora_scaling(float(alpha), r, use_rslora=bool(config.get("use_rslora")))
    return sorted(p for p, m in adapter.modules.items() if abs(m.scaling - one) > 1e-6 * abs(one))


def _vllm_notes(adapter: Adapter) -> list[str]:
    top = max((m.rank for m in adapter.modules.values()), default=0)
    if top <= VLLM_DEFAULT_MAX_LORA_RANK or top > VLLM_MAX_LORA_RANKS[-1]:
        return []
    need = next(r for r in VLLM_MAX_LORA_RANKS if r >= top)
    return [f"vllm: rank {top} needs the server started with --max-lora-rank {need} or more (the default is 16)"]


def _llama_cpp(
    adapter: Adapter, source: str, base: str | None, base_config: Mapping[str, Any] | None
) -> tuple[list[Refusal], list[str]]:
    from .gguf import plan_gguf

    if base_config is None:
        return [Refusal("base", "llama.cpp's rules depend on the base's architecture",
                        "give the base checkpoint: validate ADAPTER --runtime llama.cpp --base MODEL")], []  # fmt: skip
    plan = plan_gguf(adapter, base_config)
    return plan.problems, [f"llama.cpp: reads GGUF adapters: {_convert(source, 'gguf', f' --base {base}')}"]


def _mlx(
    adapter: Adapter, source: str, base: str | None, base_config: Mapping[str, Any] | None
) -> tuple[list[Refusal], list[str]]:
    from .mlx import mlx_refusals, reach_refusals, read_config

    notes: list[str] = []
    tied_problems: list[Refusal] = []
    if adapter.format != "mlx":
        notes.append(f"mlx: mlx-lm reads its own layout: {_convert(source, 'mlx')}")
        if len({(m.rank, m.scaling) for m in adapter.modules.values()}) > 1:
            notes.append("mlx: mlx-lm has one rank and one scale: convert folds each scaling into B and pads ranks")
        adapter, tied_problems, tied_notes = _tied_for_mlx(adapter, source, base)
        notes += tied_notes
    problems = tied_problems + mlx_refusals(adapter)
    if adapter.format == "mlx":  # its own config decides which modules mlx-lm gives LoRA layers
        layers = (base_config or {}).get("num_hidden_layers")
        problems += reach_refusals(adapter, read_config(Path(source)), layers if isinstance(layers, int) else None)
    return problems, notes


def _tied_for_mlx(adapter: Adapter, source: str, base: str | None) -> tuple[Adapter, list[Refusal], list[str]]:
    """What convert --to mlx does for a tied output layer (:func:`loratool.runtimes.mlx.tied_for_mlx`),
    with the factors read where it compares them (a lazy adapter holds shapes only)."""
    from ..arch import OUTPUT_LAYER
    from ..formats import load_adapter
    from .mlx import tied_for_mlx_on

    head = [k for k in adapter.whole if k.rsplit(".", 1)[0] == OUTPUT_LAYER]  # PEFT's saved copy of a tied head
    if head or any(m.kind == "embedding" or p == OUTPUT_LAYER for p, m in adapter.modules.items()):
        adapter = load_adapter(source)
    return tied_for_mlx_on(adapter, base)


def _peft(adapter: Adapter, source: str) -> list[Refusal]:
    if adapter.format == "kohya":
        return [Refusal("format", "PEFT reads PEFT adapter directories, not kohya files",
                        _convert(source, "peft", " --base MODEL"))]  # fmt: skip
    if adapter.format == "mlx":
        return [Refusal("format", "PEFT reads PEFT adapter directories, not mlx-lm ones", _convert(source, "peft"))]
    return []
