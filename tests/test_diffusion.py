"""Diffusion checkpoints (#33 item 3): diffusers pipeline folders (a component's folder as the base:
``PIPE/unet``, ``PIPE/transformer``) and diffusers' own LoRA files (``unet.``/``transformer.``
prefixes, each component's LoraConfig in the header). Oracles: diffusers itself, its PEFT
integration (``add_adapter``, ``save_lora_weights``, ``load_lora_adapter``), on tiny models."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_deltas

from loratool.cli import cli

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]  # linear and 3x3 conv


def tiny_unet():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).eval()  # fmt: skip


def tiny_flux():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=[0, 2, 2],
    ).eval()  # fmt: skip


def pipeline(model: torch.nn.Module, root: Path, component: str) -> Path:
    """``root`` as a diffusers pipeline folder holding ``model`` as ``component``."""
    model.save_pretrained(root / component)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root / component


def lora_file(model: torch.nn.Module, folder: Path, component: str, targets: list[str], *, metadata: bool = True,
              seed: int = 1, **config: object) -> tuple[Path, torch.nn.Module]:  # fmt: skip
    """A diffusers LoRA file written by diffusers itself, and the model holding that adapter."""
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    lora = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **config)
    model.add_adapter(lora)
    layers = {f"{component}_lora_layers": get_peft_model_state_dict(model)}
    if metadata:
        layers[f"{component}_lora_adapter_metadata"] = lora.to_dict()
    writer = diffusers.StableDiffusionPipeline if component == "unet" else diffusers.FluxPipeline
    writer.save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors", model


def run(*args: object) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else {}


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("metadata", [True, False], ids=["lora_adapter_metadata", "no metadata"])
def test_a_diffusers_lora_merges_into_its_component_as_diffusers_applies_it(tmp_path: Path, metadata: bool) -> None:
    unet = tiny_unet()
    base = pipeline(unet, tmp_path / "pipe", "unet")
    file, holder = lora_file(unet, tmp_path / "lora", "unet", UNET_TARGETS, metadata=metadata, r=2, lora_alpha=6,
                             rank_pattern={"conv1": 3})  # fmt: skip
    loaded = copy.deepcopy(unet)  # what diffusers itself loads from the file (without metadata: scaling 1)
    loaded.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="unet", adapter_name="default")
    want = peft_deltas(loaded)
    assert any(d.dim() == 4 and d.shape[-1] == 3 for d in want.values())  # conv kernels among them
    if metadata:
        assert all(torch.equal(want[k], d) for k, d in peft_deltas(holder).items())
    info = {m["module"]: m for m in run("inspect", file, "--json")["modules"]}
    assert "unet.down_blocks.0.resnets.0.conv1" in info
    run("validate", file, "--base", base)
    run("merge", base, file, "-o", tmp_path / "merged", "-q")
    merged, before = merged_state(tmp_path / "merged"), unet.state_dict()
    for module, delta in want.items():
        key = module + ".weight"
        torch.testing.assert_close(merged[key].double(), before[key].double() + delta, rtol=1e-5, atol=1e-6)
    untouched = set(before) - {m + ".weight" for m in want}
    assert all(torch.equal(merged[k], before[k]) for k in untouched)


def test_a_dora_file_merges_as_peft_merges_it_and_one_without_magnitudes_is_refused(tmp_path: Path) -> None:
    """A diffusers LoRA file written with use_dora (its lora_magnitude_vector beside the factors) merges as
    PEFT merges the loaded adapter; the same LoraConfig without the magnitudes is refused by name, as in a
    PEFT directory (PEFT would start them from the base's weight norms: merge had merged a plain LoRA)."""
    import json

    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    unet = tiny_unet()
    base = pipeline(unet, tmp_path / "pipe", "unet")
    file, holder = lora_file(unet, tmp_path / "lora", "unet", ["to_q", "to_k", "to_v", "to_out.0"], use_dora=True)
    for module in holder.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    want = {k.replace(".base_layer", ""): v for k, v in holder.state_dict().items() if "lora_" not in k}
    run("merge", base, file, "-o", tmp_path / "merged", "-q")
    merged = merged_state(tmp_path / "merged")
    assert merged.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(str(file)).items() if "lora_magnitude_vector" not in k}
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata=metadata)
    assert json.loads(metadata["lora_adapter_metadata"])["unet.use_dora"] is True
    for args in (("validate", tmp_path / "bare.safetensors"), ("merge", base, tmp_path / "bare.safetensors", "-o",
                                                                tmp_path / "m")):  # fmt: skip
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1 and "no lora_magnitude_vector" in result.output, result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("init_lora_weights", "pissa", "rewritten base"), ("alora_invocation_tokens", [1, 2], "Activated LoRA"),
     ("use_qalora", True, "QALoRA")],
)  # fmt: skip
def test_a_component_config_that_is_not_a_weight_delta_is_refused_as_in_a_peft_directory(
    tmp_path: Path, field: str, value: object, says: str
) -> None:
    """A component's LoraConfig in lora_adapter_metadata that makes the adapter something other than
    scaling * B @ A on the base (a base-rewriting init, an Activated LoRA, a LoRA variant) is refused by
    merge as in a PEFT directory's adapter_config.json; merge had merged such files as plain LoRA."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    unet = tiny_unet()
    base = pipeline(unet, tmp_path / "pipe", "unet")
    file, _ = lora_file(unet, tmp_path / "lora", "unet", ["to_q", "to_k"])
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"]) | {f"unet.{field}": value}
    save_file(load_file(str(file)), str(tmp_path / "odd.safetensors"),
              metadata=metadata | {"lora_adapter_metadata": json.dumps(config)})  # fmt: skip
    result = CliRunner().invoke(cli, ["merge", str(base), str(tmp_path / "odd.safetensors"), "-o", str(tmp_path / "m")])
    assert result.exit_code == 1 and says in result.output and field in result.output, result.output
    assert not (tmp_path / "m").exists()


def test_extract_writes_a_file_diffusers_loads_as_the_finetune(tmp_path: Path) -> None:
    unet = tiny_unet()
    base = pipeline(unet, tmp_path / "pipe", "unet")
    _, donor = lora_file(unet, tmp_path / "donor", "unet", UNET_TARGETS, r=2, lora_alpha=2, seed=2)
    ft = copy.deepcopy(unet)
    ft.load_state_dict({k: v for k, v in donor.state_dict().items() if "lora_" not in k}, strict=False)
    with torch.no_grad():
        for name, delta in peft_deltas(donor).items():
            ft.get_submodule(name).weight.add_(delta.float())
    finetuned = pipeline(ft, tmp_path / "ft", "unet")
    result = run("extract", base, finetuned, "-r", "3", "--format", "diffusers", "-o", tmp_path / "out.safetensors",
                 "--json", "-q")  # fmt: skip
    assert max(m["relative_error"] for m in result["modules"]) < 1e-5
    run("validate", tmp_path / "out.safetensors", "--base", base)
    loaded = copy.deepcopy(unet)
    loaded.load_lora_adapter(str(tmp_path), weight_name="out.safetensors", prefix="unet", adapter_name="default")
    sample, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, t, text).sample, ft(sample, t, text).sample, rtol=1e-4, atol=1e-5)


def test_flux_transformer_extract_and_merge(tmp_path: Path) -> None:
    flux = tiny_flux()
    base = pipeline(flux, tmp_path / "pipe", "transformer")
    file, holder = lora_file(flux, tmp_path / "lora", "transformer", ["to_q", "to_k", "proj_mlp", "ff.net.2"], r=2,
                             lora_alpha=4)  # fmt: skip
    run("merge", base, file, "-o", tmp_path / "merged", "-q")
    merged, before = merged_state(tmp_path / "merged"), flux.state_dict()
    deltas = peft_deltas(holder)
    for module, delta in deltas.items():
        torch.testing.assert_close(merged[module + ".weight"].double(), before[module + ".weight"].double() + delta)
    finetuned = tmp_path / "ft" / "transformer"  # the merged transformer as a fine-tune's component
    shutil.copytree(tmp_path / "merged", finetuned)
    (tmp_path / "ft" / "model_index.json").write_text("{}")
    run("extract", base, finetuned, "-r", "2", "--format", "diffusers", "-o", tmp_path / "x.safetensors", "-q")
    loaded = copy.deepcopy(flux)
    loaded.load_lora_adapter(str(tmp_path), weight_name="x.safetensors", prefix="transformer", adapter_name="default")
    for module, delta in peft_deltas(loaded).items():
        torch.testing.assert_close(delta, deltas[module], rtol=1e-4, atol=1e-6)


def test_components_are_chosen_by_the_base_and_named_when_missing(tmp_path: Path) -> None:
    unet = tiny_unet()
    base = pipeline(unet, tmp_path / "pipe", "unet")
    file, _ = lora_file(unet, tmp_path / "lora", "unet", ["to_q"], r=2, lora_alpha=2)
    root = CliRunner().invoke(cli, ["merge", str(tmp_path / "pipe"), str(file), "-o", str(tmp_path / "m")])
    assert root.exit_code == 1 and "diffusers pipeline folder" in root.output and "unet" in root.output
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "diffusion_pytorch_model.safetensors").write_bytes(
        (base / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    no_component = CliRunner().invoke(cli, ["merge", str(plain), str(file), "-o", str(tmp_path / "m")])
    assert no_component.exit_code == 1 and "pipeline component" in no_component.output
    assert "PIPELINE/unet" in no_component.output and not (tmp_path / "m").exists()
    peft_dir = tmp_path / "as-peft"
    run("convert", file, "--to", "peft", "--base", base, "-o", peft_dir, "-q")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(unet), peft_dir)
    assert set(peft_deltas(back)) == {m for m, _ in unet.named_modules() if m.endswith("to_q")}
    run("convert", peft_dir, "--to", "diffusers", "--base", base, "-o", tmp_path / "again.safetensors", "-q")
    run("combine", file, f"{tmp_path / 'again.safetensors'}:-0.5", "--format", "diffusers", "-o",
        tmp_path / "c.safetensors", "-q")  # fmt: skip
    combined = copy.deepcopy(unet)  # diffusers loads the combined file: half the adapter's delta
    combined.load_lora_adapter(str(tmp_path), weight_name="c.safetensors", prefix="unet", adapter_name="default")
    for module, delta in peft_deltas(combined).items():
        torch.testing.assert_close(delta, 0.5 * peft_deltas(back)[module], rtol=1e-5, atol=1e-7)
    mixed = CliRunner().invoke(cli, ["combine", str(file), str(peft_dir), "-o", str(tmp_path / "bad")])
    assert mixed.exit_code == 1 and "pipeline component" in mixed.output


def test_kohya_sd_names_map_onto_the_unet_and_text_encoder_modules_are_left_out(tmp_path: Path) -> None:
    """kohya's SD 1.x/2.x LoRA names are diffusers' module paths underscored (lora_unet_down_blocks_0_...,
    lora_te_text_model_...): merged into PIPE/unet by the base's paths, the text encoder's left out.
    Names in another model's original layout (Flux's double_blocks, given a UNet) are refused by name."""
    from safetensors.torch import save_file

    unet = tiny_unet()
    base = pipeline(unet, tmp_path / "pipe", "unet")
    _, holder = lora_file(unet, tmp_path / "lora", "unet", UNET_TARGETS, r=2, lora_alpha=4)
    from loratool import load_adapter

    peft_dir = tmp_path / "p"
    holder_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    run("convert", holder_file, "--to", "peft", "--base", base, "-o", peft_dir, "-q")
    tensors = {}
    for path, m in load_adapter(peft_dir).modules.items():
        a, b = m.lora_A, m.lora_B
        if m.kernel is not None:
            a, b = a.reshape(a.shape[0], -1, *m.kernel), b.reshape(*b.shape, 1, 1)
        prefix = "lora_unet_" + path.replace(".", "_")
        tensors |= {
            f"{prefix}.lora_down.weight": a,
            f"{prefix}.lora_up.weight": b,
            f"{prefix}.alpha": torch.tensor(4.0),
        }
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors |= {f"{te}.lora_down.weight": torch.randn(2, 8), f"{te}.lora_up.weight": torch.randn(8, 2)}
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    result = CliRunner().invoke(cli, ["merge", str(base), str(tmp_path / "kohya.safetensors"), "-o",
                                      str(tmp_path / "m"), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 module(s) of other pipeline components left out" in result.output
    merged, before = merged_state(tmp_path / "m"), unet.state_dict()
    for module, delta in peft_deltas(holder).items():
        torch.testing.assert_close(merged[module + ".weight"].double(), before[module + ".weight"].double() + delta)
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 8),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(24, 2)}  # fmt: skip
    save_file(flux, str(tmp_path / "flux.safetensors"))
    refused = CliRunner().invoke(cli, ["merge", str(base), str(tmp_path / "flux.safetensors"), "-o",
                                       str(tmp_path / "x")])  # fmt: skip
    assert refused.exit_code == 1 and "original model's layout" in refused.output and not (tmp_path / "x").exists()


def test_kohya_sdxl_names_in_the_original_layout_map_as_diffusers_maps_them(tmp_path: Path) -> None:
    """SDXL's kohya names follow the original UNet (input_blocks.4.1..., in_layers.2, op): loratool's
    table (formats.diffusers.sgm_names, run from a diffusers UNet's paths) is diffusers' own
    conversion run backwards: diffusers reads every name it makes as the module it came from. The
    merge then adds each module's delta where diffusers would."""
    import re

    from safetensors.torch import save_file

    from loratool.formats.diffusers import sgm_names

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    ).eval()  # fmt: skip
    base = pipeline(unet, tmp_path / "pipe", "unet")
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    table = sgm_names(layers, unet.config)
    assert set(table.values()) == set(layers)
    tensors, want = {}, {}
    for sgm, path in table.items():
        m, prefix = layers[path], "lora_unet_" + sgm.replace(".", "_")
        if isinstance(m, torch.nn.Linear):
            down, up = torch.randn(2, m.in_features), torch.randn(m.out_features, 2)
        else:
            down, up = torch.randn(2, m.in_channels, *m.kernel_size), torch.randn(m.out_channels, 2, 1, 1)
        tensors |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}
        tensors[f"{prefix}.alpha"] = torch.tensor(3.0)  # scaling 3 / 2
        want[path] = 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape)
    save_file(tensors, str(tmp_path / "sdxl.safetensors"))

    state, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "sdxl.safetensors"),
                                                                   unet_config=unet.config)  # fmt: skip

    def module_of(key: str) -> str:  # diffusers' names: <path>.lora.down.weight, attn1.processor.to_q_lora...
        k = key.removeprefix("unet.")
        if m := re.match(r"(.+)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$", k):
            return f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
        return k.rsplit(".lora.", 1)[0]

    read = {module_of(k): v for k, v in state.items() if k.endswith("down.weight")}
    assert set(read) == set(layers)
    for sgm, path in table.items():
        assert torch.equal(read[path], tensors["lora_unet_" + sgm.replace(".", "_") + ".lora_down.weight"]), path
    run("merge", base, tmp_path / "sdxl.safetensors", "-o", tmp_path / "m", "-q")
    merged, before = merged_state(tmp_path / "m"), unet.state_dict()
    for path, delta in want.items():
        torch.testing.assert_close(merged[path + ".weight"], before[path + ".weight"] + delta, rtol=1e-5, atol=1e-5)
    run("validate", tmp_path / "sdxl.safetensors", "--base", base)


def flux_kohya(flux: torch.nn.Module, stems: dict[str, list[str]], seed: int) -> dict[str, torch.Tensor]:
    """A kohya file's tensors for Flux (sd-scripts' names): ``stems`` maps each name to the diffusers
    modules whose rows its fused weight stacks, in order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for stem, paths in stems.items():
        rows = sum(flux.get_submodule(p).out_features for p in paths)
        cols = flux.get_submodule(paths[0]).in_features
        out[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(2, cols, generator=g)
        out[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(rows, 2, generator=g)
        out[f"lora_unet_{stem}.alpha"] = torch.tensor(3.0)
    return out


def test_kohya_flux_names_map_and_split_as_diffusers_reads_them(tmp_path: Path) -> None:
    """Flux's kohya names (the original model's layout: double_blocks with q, k and v fused) merge
    into diffusers' FluxTransformer2DModel as diffusers' own conversion applies them; a single block's
    linear1 (q, k, v and the MLP fused) as its rows split by the formula (diffusers' converter takes
    only full-size Flux there), and the final modulation with its shift and scale rows swapped."""
    from safetensors.torch import save_file

    flux = tiny_flux()
    base = pipeline(flux, tmp_path / "pipe", "transformer")
    double = {
        "double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                         "transformer_blocks.0.attn.to_v"],
        "double_blocks_0_txt_attn_qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                         "transformer_blocks.0.attn.add_v_proj"],
        "double_blocks_0_img_attn_proj": ["transformer_blocks.0.attn.to_out.0"],
        "double_blocks_0_img_mlp_0": ["transformer_blocks.0.ff.net.0.proj"],
        "double_blocks_0_txt_mod_lin": ["transformer_blocks.0.norm1_context.linear"],
        "img_in": ["x_embedder"], "time_in_in_layer": ["time_text_embed.timestep_embedder.linear_1"],
        "final_layer_linear": ["proj_out"], "final_layer_adaLN_modulation_1": ["norm_out.linear"],
    }  # fmt: skip
    save_file(flux_kohya(flux, double, 0), str(tmp_path / "double.safetensors"))
    converted = diffusers.FluxPipeline.lora_state_dict(str(tmp_path / "double.safetensors"))
    converted = converted[0] if isinstance(converted, tuple) else converted
    want = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"): converted[k.replace("lora_A", "lora_B")]
            @ converted[k] for k in converted if k.endswith("lora_A.weight")}  # fmt: skip
    assert set(want) == {p for ps in double.values() for p in ps}
    run("merge", base, tmp_path / "double.safetensors", "-o", tmp_path / "m", "-q")
    merged, before = merged_state(tmp_path / "m"), flux.state_dict()
    for path, delta in want.items():
        if path in ("proj_out", "norm_out.linear"):  # diffusers drops the final layer's alpha; kohya scales by it
            delta = 1.5 * delta
        torch.testing.assert_close(merged[path + ".weight"] - before[path + ".weight"], delta, rtol=1e-4, atol=1e-5,
                                   msg=path)  # fmt: skip

    one = "single_transformer_blocks.0"
    single = {"single_blocks_0_linear1": [f"{one}.attn.to_q", f"{one}.attn.to_k", f"{one}.attn.to_v",
                                          f"{one}.proj_mlp"],
              "single_blocks_0_modulation_lin": [f"{one}.norm.linear"]}  # fmt: skip
    tensors = flux_kohya(flux, single, 1)
    save_file(tensors, str(tmp_path / "single.safetensors"))
    run("merge", base, tmp_path / "single.safetensors", "-o", tmp_path / "s", "-q")
    run("validate", tmp_path / "single.safetensors", "--base", base)
    merged = merged_state(tmp_path / "s")
    for stem, paths in single.items():
        fused = torch.cat([before[p + ".weight"] for p in paths])  # the original model's weight
        up, down = tensors[f"lora_unet_{stem}.lora_up.weight"], tensors[f"lora_unet_{stem}.lora_down.weight"]
        fused = fused + 1.5 * up @ down
        torch.testing.assert_close(torch.cat([merged[p + ".weight"] for p in paths]), fused, rtol=1e-5, atol=1e-5)


def test_metadata_keys_of_no_component_are_left_out_as_diffusers_leaves_them(tmp_path: Path) -> None:
    """diffusers' loader keeps the ``<component>.`` keys of lora_adapter_metadata only: a stray
    ``lora_alpha`` changes nothing it loads. validate said "metadata/lora_alpha: 'peft_type' is a
    required property" (it was read as a component of that name); now it warns, naming the key, and
    the merge is the unchanged file's."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    unet = tiny_unet()
    base = pipeline(unet, tmp_path / "pipe", "unet")
    file, _ = lora_file(unet, tmp_path / "lora", "unet", ["to_q", "conv1"], r=2, lora_alpha=6)
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    flat = json.loads(metadata["lora_adapter_metadata"])
    stray = tmp_path / "stray.safetensors"
    save_file(load_file(str(file)), str(stray), metadata={
        **metadata, "lora_adapter_metadata": json.dumps({**flat, "lora_alpha": "six", "r": 0})})  # fmt: skip
    result = CliRunner().invoke(cli, ["validate", str(stray), "--base", str(base), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["valid"], report
    assert any(w.startswith("metadata/lora_alpha: names no pipeline component") for w in report["warnings"]), report
    run("merge", base, file, "-o", tmp_path / "want", "-q")
    run("merge", base, stray, "-o", tmp_path / "got", "-q")
    want, got = merged_state(tmp_path / "want"), merged_state(tmp_path / "got")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_fitting_a_flux_kohya_file_to_its_base_costs_torch_no_symbolic_shapes(tmp_path: Path) -> None:
    """`validate --base` maps a Flux kohya file's names onto the base from the headers (factors as ``meta``
    tensors): swapping the final modulation's shift and scale rows there by a concatenation made torch
    import its symbolic shapes (sympy: about a second)."""
    from helpers import SYMBOLIC_SHAPES, main_in_a_process
    from safetensors.torch import save_file

    flux = tiny_flux()
    base = pipeline(flux, tmp_path / "pipe", "transformer")
    stems = {"final_layer_adaLN_modulation_1": ["norm_out.linear"],
             "double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                              "transformer_blocks.0.attn.to_v"]}  # fmt: skip
    save_file(flux_kohya(flux, stems, 0), str(tmp_path / "flux.safetensors"))
    out = main_in_a_process(["validate", tmp_path / "flux.safetensors", "--base", base],
                            then=SYMBOLIC_SHAPES)  # fmt: skip
    assert "symbolic shapes: False" in out, out


def test_a_kohya_flux_file_combines_and_resizes_against_its_component_and_a_wrong_one_is_refused(
    tmp_path: Path,
) -> None:
    """combine and resize with --base PIPE/transformer read a kohya Flux file as merge does (they refused
    its names before: 'map to no module path'); a fused projection whose rows do not add up to the base's
    parts is refused by name (it was 'a loratool bug')."""
    from safetensors.torch import save_file

    flux = tiny_flux()
    base = pipeline(flux, tmp_path / "pipe", "transformer")
    stems = {"double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                              "transformer_blocks.0.attn.to_v"],
             "img_in": ["x_embedder"]}  # fmt: skip
    tensors = flux_kohya(flux, stems, 2)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    run("combine", tmp_path / "k.safetensors", f"{tmp_path / 'k.safetensors'}:0.5", "--base", base, "-o",
        tmp_path / "c", "-q")  # fmt: skip
    run("merge", base, tmp_path / "c", "-o", tmp_path / "mc", "-q")
    run("merge", base, f"{tmp_path / 'k.safetensors'}:1.5", "-o", tmp_path / "mk", "-q")
    combined, scaled = merged_state(tmp_path / "mc"), merged_state(tmp_path / "mk")
    assert combined.keys() == scaled.keys()
    for key in combined:
        torch.testing.assert_close(combined[key], scaled[key], rtol=1e-5, atol=1e-6, msg=key)
    run("resize", tmp_path / "k.safetensors", "-r", "2", "--base", base, "-o", tmp_path / "r", "-q")  # rank 2: exact
    run("merge", base, tmp_path / "r", "-o", tmp_path / "mr", "-q")
    run("merge", base, tmp_path / "k.safetensors", "-o", tmp_path / "m1", "-q")
    resized, once = merged_state(tmp_path / "mr"), merged_state(tmp_path / "m1")
    for key in once:
        torch.testing.assert_close(resized[key], once[key], rtol=1e-5, atol=1e-6, msg=key)

    up = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
    save_file({**tensors, up: tensors[up][:-1].contiguous()}, str(tmp_path / "bad.safetensors"))
    for args in (("merge", base, tmp_path / "bad.safetensors"), ("combine", tmp_path / "bad.safetensors", "--base",
                 base), ("validate", tmp_path / "bad.safetensors", "--base", base)):  # fmt: skip
        result = CliRunner().invoke(cli, [str(a) for a in (*args, *(["-o", tmp_path / "out"] if args[0] != "validate"
                                                                    else []))])  # fmt: skip
        assert result.exit_code == 1 and "'lora_unet_double_blocks_0_img_attn_qkv' has 23 output rows" in result.output
        assert "loratool bug" not in result.output and not (tmp_path / "out").exists()
