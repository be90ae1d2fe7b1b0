"""The in-memory adapter: LoRA factors per module, whole tensors, and the config they came with.

Names follow the field (microsoft/LoRA, PEFT): ``lora_A`` is (r, in), ``lora_B`` is (out, r) and
``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The delta a module adds to its base
weight depends on the layer kind:

- ``linear``:    W (out, in)   += scaling * B @ A
- ``conv1d``:    W (in, out)   += scaling * (B @ A).T   (GPT-2 ``Conv1D``, PEFT's fan_in_fan_out)
- ``embedding``: W (num, dim)  += scaling * (B @ A).T   (PEFT's lora_embedding_A (r, num), _B (dim, r))
- ``conv2d``:    W (out, in, kh, kw) += scaling * (B @ A).reshape(out, in, kh, kw)   (PEFT's Conv2d,
  kohya's LoCon: A is held flattened, (r, in * kh * kw), from the file's (r, in, kh, kw); B (out, r)
  from (out, r, 1, 1); ``LoraModule.kernel`` keeps (kh, kw))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Kind = Literal["linear", "conv1d", "embedding", "conv2d"]


def stored_transposed(kind: Kind) -> bool:
    """The orientation rule, owned here: does ``kind``'s base weight store the transpose of B @ A?

    Linear weights are (out, in), like B @ A, and a Conv2d weight (out, in, kh, kw) flattens to
    (out, in * kh * kw) as A does. GPT-2 ``Conv1D`` stores (in, out), and an embedding (num, dim) with
    A (r, num) and B (dim, r): both hold (B @ A).T.
    """
    return kind in ("conv1d", "embedding")


# init_lora_weights values whose adapters were trained against a rewritten base weight.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


CONV_LORA_WHY = (
    "a Conv1d or Conv3d LoRA (3-D or 5-D factors): loratool forms the deltas of Conv2d LoRA (4-D factors) only"
)
CONV_LORA_FIX = "merge it with PEFT (merge_and_unload) or the trainer's own tools"


def conv_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None:
    """A Conv2d LoRA's factors as the file holds them, A (r, in, kh, kw) and B (out, r, 1, 1), as
    loratool holds them: A (r, in * kh * kw), B (out, r) and the kernel (kh, kw). None when they are
    not that layout (then the caller names what is wrong)."""
    if a.dim() != 4 or b.dim() != 4 or tuple(b.shape[2:]) != (1, 1) or a.shape[0] != b.shape[1]:
        return None
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1]), (int(a.shape[2]), int(a.shape[3]))


def conv_file_factors(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv2d module's factors in the files' layout: A (r, in, kh, kw), B (out, r, 1, 1)."""
    assert module.kernel is not None
    kh, kw = module.kernel
    a, b = module.lora_A, module.lora_B
    return a.reshape(a.shape[0], -1, kh, kw), b.reshape(b.shape[0], b.shape[1], 1, 1)


@dataclass
class LoraModule:
    """One adapted module's factors and how they scale."""

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    alpha: float
    kind: Kind = "linear"
    use_rslora: bool = False
    bias: torch.Tensor | None = None  # lora_B.bias, (out,), scaled like the delta
    magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector
    expert: tuple[int, int] | None = None  # (e, E): expert e of a 3-D parameter's E (see loratool.experts)
    kernel: tuple[int, int] | None = None  # conv2d: (kh, kw); lora_A is then (r, in * kh * kw)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, use_rslora=self.use_rslora)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module adapts."""
        if self.kernel is not None:  # conv2d: (out, in, kh, kw)
            kh, kw = self.kernel
            return (self.out_features, self.in_features // (kh * kw), kh, kw)
        out_in = (self.out_features, self.in_features)
        return out_in[::-1] if stored_transposed(self.kind) else out_in

    @property
    def num_params(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel() + (self.bias.numel() if self.bias is not None else 0)


@dataclass
class Adapter:
    """A LoRA adapter in memory.

    ``modules`` maps module paths as in the base model (``model.layers.0.self_attn.q_proj``, no
    ``base_model.model.`` prefix) to factors. ``whole`` maps base-model tensor names to tensors
    that replace the base's (PEFT's ``modules_to_save`` and ``.base_layer.`` entries).
    ``config`` is the PEFT ``adapter_config.json`` content (built or as read), ``metadata`` the
    safetensors header.
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    # PEFT's trainable tokens: weight key -> (row indices, the new rows (n, dim)); merged by replacing rows
    token_rows: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    format: Literal["peft", "kohya", "mlx", "diffusers"] = "peft"
    path: str | None = None

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values()) + sum(t.numel() for t in self.whole.values())

    @property
    def replaced(self) -> list[str]:
        """The tensors the adapter replaces with trained values (PEFT's modules_to_save), not the base
        layers PEFT saves beside a LoRA'd embedding: a replacement has no scale to merge it at."""
        return sorted(k for k in self.whole if k.rsplit(".", 1)[0] not in self.modules)

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora")) or any(m.magnitude is not None for m in self.modules.values())

    @property
    def init_lora_weights(self) -> str:
        return str(self.config.get("init_lora_weights", True)).lower()

    @property
    def rewrites_base(self) -> bool:
        return self.init_lora_weights.startswith(BASE_REWRITING_INITS)

    @property
    def base_model_name_or_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None


def lora_scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_lookup(patterns: Mapping[str, Any], module_path: str) -> Any | None:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: first key (a regex) matching the path's end.

    Keys match as ``re.match(rf"(.*\\.)?({key})$", module_path)``, in mapping order.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def module_alpha(config: Mapping[str, Any], module_path: str) -> float:
    found = pattern_lookup(config.get("alpha_pattern") or {}, module_path)
    return float(found if found is not None else config.get("lora_alpha", 8))
