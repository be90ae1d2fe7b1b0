"""combine --method ties|dare_*|magnitude_prune and their _svd forms, against PEFT's add_weighted_adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_model, peft_adapter, peft_deltas, tiny_model
from safetensors.torch import load_file
from test_combine import dense

from loratool.math.task_arithmetic import MergeStats, kth_largest, merge_tasks, prune
from loratool.ops.combine import combine

WEIGHTS = [0.8, -0.5, 1.2]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Three rank-4 adapters (PEFT's factor-wise methods need equal ranks) with different alphas."""
    root = tmp_path_factory.mktemp("sparse")
    tiny_model("llama").save_pretrained(root / "base")
    paths = []
    for i, alpha in enumerate((8, 4, 6)):
        pm = peft_adapter(load_model("llama", root / "base"), ["q_proj", "v_proj", "down_proj"], r=4, alpha=alpha,
                          seed=10 + i)  # fmt: skip
        pm.save_pretrained(root / f"a{i}")
        paths.append(root / f"a{i}")
    return root / "base", paths


def peft_mix(base: Path, paths: list[Path], method: str, **kw: object):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model("llama", base), paths[0], adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(p, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(paths))], WEIGHTS, "mix", combination_type=method, **kw)
    return model


DETERMINISTIC = [
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.5, "svd_rank": 3}),
    ("ties_svd", {"density": 0.6, "svd_rank": 4, "svd_clamp": 0.95}),
    ("magnitude_prune_svd", {"density": 0.5}),
]


@pytest.mark.parametrize(("method", "kw"), DETERMINISTIC, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_equal_to_peft_add_weighted_adapter(tmp_path: Path, three, method: str, kw: dict) -> None:
    base, paths = three
    expected = peft_deltas(peft_mix(base, paths, method, **kw), "mix")
    res = combine(list(zip(paths, WEIGHTS)), output=tmp_path / "ours", method=method, density=kw["density"],
                  majority_sign=kw.get("majority_sign_method", "total"), rank=kw.get("svd_rank"),
                  svd_clamp=kw.get("svd_clamp"), show_progress=False)  # fmt: skip
    ours = dense(tmp_path / "ours")
    assert expected and set(ours) == set(expected)
    for mod, delta in expected.items():
        assert torch.allclose(ours[mod], delta, rtol=1e-4, atol=1e-6), mod
    for r in res.report:  # the report means something: a real error against the exact sum, a density
        assert 0 < r.relative_error and 0 < (r.density or 0) <= 1
        assert (r.sign_agreement is not None) == method.startswith("ties")


@pytest.mark.parametrize("method", ["ties", "linear", "cat", "magnitude_prune_svd"])
def test_rslora_sources_combine_as_their_plain_equivalents(tmp_path: Path, three, method: str) -> None:
    """Each source as rsLoRA with alpha' = alpha / sqrt(r) has the plain source's scaling, alpha / r,
    folded into its factors either way: the same output. (PEFT's add_weighted_adapter from rsLoRA
    sources gives sqrt(r) times this, huggingface/peft#3449; docs/formats.md, Combining.)"""
    import json
    import math
    import shutil

    _, paths = three
    outs = []
    for rslora in (False, True):
        sources = []
        for i, p in enumerate(paths):
            q = tmp_path / f"{rslora}-{i}"
            shutil.copytree(p, q)
            cfg = json.loads((q / "adapter_config.json").read_text())
            if rslora:  # the same scaling, alpha / r = alpha' / sqrt(r)
                cfg.update(use_rslora=True, lora_alpha=cfg["lora_alpha"] / math.sqrt(cfg["r"]))
            (q / "adapter_config.json").write_text(json.dumps(cfg))
            sources.append(q)
        combine(list(zip(sources, WEIGHTS)), output=tmp_path / f"out-{rslora}", method=method,
                density=None if method in ("linear", "cat") else 0.5, show_progress=False)  # fmt: skip
        outs.append(dense(tmp_path / f"out-{rslora}"))
    assert outs[0].keys() == outs[1].keys()
    for mod in outs[0]:
        torch.testing.assert_close(outs[1][mod], outs[0][mod], rtol=1e-5, atol=1e-7, msg=mod)


@pytest.mark.parametrize(("method", "linear_only"), [("dare_linear", False), ("dare_ties", False),
                                                      ("dare_linear_svd", True), ("dare_ties_svd", True)])  # fmt: skip
def test_dare_equal_to_peft_given_the_same_masks(tmp_path: Path, three, monkeypatch, method: str, linear_only) -> None:
    """PEFT draws its masks from torch's global generator; record them, then give ours the same."""
    from loratool.math import task_arithmetic
    from loratool.ops import combine as combine_ops

    base, paths = three
    drawn: list[torch.Tensor] = []
    real = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda t, *a, **k: drawn.append(real(t, *a, **k)) or drawn[-1])
    model = peft_mix(base, paths, method, density=0.5)
    monkeypatch.setattr(torch, "bernoulli", real)
    modules = [
        n for n, layer in model.base_model.model.named_modules() if hasattr(layer, "lora_A") and "mix" in layer.lora_A
    ]
    parts = ["delta"] if method.endswith("_svd") else ["A", "B"]  # PEFT's order: per module, A's then B's
    order = [(m, part, i) for m in modules for part in parts for i in range(len(paths))]
    masks = dict(zip(order, drawn, strict=True))
    monkeypatch.setattr(combine_ops, "_generators", lambda seed, path, n, part: [(path, part, i) for i in range(n)])
    monkeypatch.setattr(task_arithmetic, "random_mask", lambda shape, density, generator: masks[generator])
    combine(list(zip(paths, WEIGHTS)), output=tmp_path / "ours", method=method, density=0.5, show_progress=False)
    ours, expected = dense(tmp_path / "ours"), peft_deltas(model, "mix")
    assert expected and set(ours) == set(expected)
    for mod, delta in expected.items():
        assert torch.allclose(ours[mod], delta, rtol=1e-4, atol=1e-6), mod


def test_dare_rescaling_is_unbiased_and_keeps_the_density() -> None:
    """E[prune(t, d)] = t: the mean of many independent draws converges to t; about d of it is kept."""
    t = torch.linspace(-1, 1, 64)
    draws = torch.stack([prune(t, 0.3, "random", torch.Generator().manual_seed(s)) for s in range(4000)])
    sigma = t.abs() * ((1 - 0.3) / 0.3 / 4000) ** 0.5  # std of the mean of Bernoulli(d)/d * t
    assert ((draws.mean(0) - t).abs() <= 5 * sigma + 1e-9).all()
    assert abs(float((draws != 0).float().mean()) - 0.3 * 63 / 64) < 0.01  # linspace holds one exact zero


def test_dare_is_deterministic_for_a_seed_whatever_the_cores(tmp_path: Path, three, monkeypatch) -> None:
    from loratool import host as runtime

    _, paths = three
    outputs = []
    for cores in (1, 2):
        monkeypatch.setattr(runtime, "available_cores", lambda cores=cores: cores)
        out = tmp_path / f"c{cores}"
        combine(list(zip(paths, WEIGHTS)), output=out, method="dare_ties", density=0.5, seed=3, show_progress=False)
        outputs.append(load_file(str(out / "adapter_model.safetensors")))
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    other = combine(list(zip(paths, WEIGHTS)), output=tmp_path / "s4", method="dare_ties", density=0.5, seed=4,
                    show_progress=False)  # fmt: skip
    assert other.report and not torch.equal(
        load_file(str(tmp_path / "s4" / "adapter_model.safetensors"))[next(iter(outputs[0]))],
        next(iter(outputs[0].values())),
    )


def test_ties_elects_the_sign_and_averages_what_agrees() -> None:
    a, b, c = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 1.0, -1.0]), torch.tensor([-4.0, 1.0, 0.0])
    out = merge_tasks([a, b, c], [1.0, 1.0, 1.0], "ties", density=1.0)
    # sums 1+2-4 = -1 (elect -): only -4 agrees; -2+1+1 = 0 (ties go to +): 1, 1; 3-1+0 = 2 (+): 3
    assert torch.equal(out, torch.tensor([-4.0, 1.0, 3.0]))


@pytest.mark.parametrize(
    "values",
    [
        lambda g: torch.randn(1 << 20, generator=g).abs(),
        lambda g: torch.randint(0, 50, (1 << 20,), generator=g).float(),  # few distinct values: ties everywhere
        lambda g: torch.arange(1 << 20, dtype=torch.float32),  # sorted
        lambda g: torch.cat([torch.zeros(1 << 19), torch.rand(1 << 19, generator=g)]),  # a block of zeros
    ],
    ids=["gaussian", "ties", "sorted", "half-zero"],
)
def test_kth_largest_is_exact_selection(values) -> None:
    """The sampled bracket never changes the answer: kthvalue's value, and the count at or above it."""
    v = values(torch.Generator().manual_seed(5))
    n = v.numel()
    for k in (1, 7, n // 10, n // 2, n - 3, n):
        got, at_least = kth_largest(v, k)
        want = torch.kthvalue(v, n - k + 1).values
        assert got == want and at_least == int((v >= want).sum()) and at_least >= k, k


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties", "dare_linear", "linear"])
def test_merge_tasks_on_large_tensors_equals_peft_merge_utils(method: str, monkeypatch) -> None:
    """Several chunks and the sampled threshold at work, against PEFT's functions (float64: no equal magnitudes)."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(6)
    tasks = [torch.randn(700, 1500, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    weights = [0.7, -0.4, 1.1]
    masks = [torch.bernoulli(torch.full((700, 1500), 0.3, dtype=torch.float64), generator=g) for _ in tasks]
    if method.startswith("dare"):
        drawn = iter(masks)
        monkeypatch.setattr(torch, "bernoulli", lambda t, *a, **k: next(drawn))
    w = torch.tensor(weights, dtype=torch.float64)
    expected = {
        "ties": lambda: merge_utils.ties(tasks, w, 0.3, "total"),
        "magnitude_prune": lambda: merge_utils.magnitude_prune(tasks, w, 0.3),
        "dare_ties": lambda: merge_utils.dare_ties(tasks, w, 0.3, "frequency"),
        "dare_linear": lambda: merge_utils.dare_linear(tasks, w, 0.3),
        "linear": lambda: merge_utils.task_arithmetic(tasks, w),
    }[method]()
    monkeypatch.undo()
    gens = [torch.Generator() for _ in tasks]
    mask_of = dict(zip(map(id, gens), masks))
    from loratool.math import task_arithmetic

    monkeypatch.setattr(task_arithmetic, "random_mask", lambda shape, density, generator: mask_of[id(generator)])
    stats = MergeStats()
    ours = merge_tasks(tasks, weights, method, density=0.3, generators=gens, stats=stats,  # type: ignore[arg-type]
                       sign_method="frequency" if method == "dare_ties" else "total")  # fmt: skip
    assert torch.allclose(ours, expected, rtol=1e-12, atol=1e-15)
    if method != "linear":
        assert abs(stats.density - 0.3) < 0.01
    assert (stats.sign_agreement is not None) == method.endswith("ties")


def test_any_seed_draws_and_the_usual_ones_draw_as_before(tmp_path: Path, three) -> None:
    """Seeds are taken whole: one whose derived value passes torch's range (which refuses it with an
    overflow, reported as a loratool bug by extract and by DARE) is reduced modulo 2^64; those inside
    it seed torch as they always did."""
    import zlib

    from loratool.stream.deltas import seeded_generator

    for seed in (0, 3, -1, 2**40):
        want = seed * 1_000_003 + zlib.crc32(b"m|A") + 2
        assert torch.equal(torch.randn(4, generator=seeded_generator(seed, "m|A", 2)),
                           torch.randn(4, generator=torch.Generator().manual_seed(want)))  # fmt: skip
    huge = 10**23
    assert seeded_generator(huge, "m").initial_seed() == (huge * 1_000_003 + zlib.crc32(b"m")) % 2**64
    _, paths = three
    r = combine(list(zip(paths, WEIGHTS)), output=tmp_path / "dare", method="dare_ties", density=0.5, seed=huge,
                show_progress=False)  # fmt: skip
    assert r.report
