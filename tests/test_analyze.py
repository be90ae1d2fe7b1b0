"""`loratool analyze` against its oracles: exact SVD, phi and the amplification factor by their
definitions, a planted spectrum whose ranks are known, and extract's own rank rules."""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import file_digest
from safetensors.torch import save_file

from loratool.adapter import Adapter, LoraModule
from loratool.analysis import spectral
from loratool.errors import LoraToolError
from loratool.formats import load_adapter, save_adapter
from loratool.ops.analyze import analyze
from loratool.ops.extract import extract

PLANTED = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
# energy shares of PLANTED: 0.750, 0.938, 0.985, 0.9963, 0.99927, 1.0
PLANTED_RANKS = {"0.5": 1, "0.9": 2, "0.99": 4}


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def planted_delta(out: int, inp: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return orthonormal(out, len(s), g) @ torch.diag(s) @ orthonormal(inp, len(s), g).T


def write_pair(tmp_path: Path, deltas: dict[str, torch.Tensor], extra: dict[str, torch.Tensor] | None = None):
    g = torch.Generator().manual_seed(1)
    base = {k: torch.randn(d.shape, generator=g, dtype=torch.float64) for k, d in deltas.items()}
    base.update(extra or {})
    ft = {k: v + deltas[k] if k in deltas else v for k, v in base.items()}
    for name, tensors in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    return tmp_path / "base", tmp_path / "ft", {k: v.float().double() for k, v in base.items()}


# -- the math, by definition ----------------------------------------------------------------------------
def phi_by_definition(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    u1 = torch.linalg.svd(A1.double(), full_matrices=False)[2][:i].T  # top-i right-singular vectors
    u2 = torch.linalg.svd(A2.double(), full_matrices=False)[2][:j].T
    return float(torch.linalg.matrix_norm(u1.T @ u2) ** 2) / min(i, j)


def test_subspace_similarity_is_phi_by_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    A1, A2 = torch.randn(8, 40, generator=g), torch.randn(5, 40, generator=g)
    phi = spectral.subspace_similarity(A1, A2)
    assert phi.shape == (8, 5)
    for i in range(1, 9):
        for j in range(1, 6):
            assert phi[i - 1, j - 1].item() == pytest.approx(phi_by_definition(A1, A2, i, j), abs=1e-12)
    assert float(phi.min()) >= 0 and float(phi.max()) <= 1 + 1e-12


def test_subspace_similarity_of_one_row_space_is_one() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 30, generator=g)
    mixed = torch.randn(6, 6, generator=g) @ A  # the same row space, other singular vectors
    assert torch.diagonal(spectral.subspace_similarity(A, A)).tolist() == pytest.approx([1.0] * 6, abs=1e-12)
    assert spectral.subspace_similarity(A, mixed)[5, 5].item() == pytest.approx(1.0, abs=1e-12)
    assert spectral.subspace_similarity(A, mixed)[0, 0].item() < 0.999  # the top directions differ


def test_amplification_by_its_formula() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 20, generator=g, dtype=torch.float64)
    dW = torch.randn(30, 20, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    got = spectral.amplification(U, S, Vh, W, [1, 3, 20, 99])
    assert set(got) == {1, 3, 20}  # ranks beyond the spectrum are left out
    for r, value in got.items():
        dW_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        expected = torch.linalg.matrix_norm(dW_r) / torch.linalg.matrix_norm(U[:, :r].T @ W @ Vh[:r].T)
        assert value == pytest.approx(float(expected), rel=1e-12)
    assert got[20] == pytest.approx(float(torch.linalg.matrix_norm(dW) / torch.linalg.matrix_norm(U.T @ W @ Vh.T)))


def test_amplification_stops_at_the_numerical_rank() -> None:
    """A rank-4 update's singular vectors past the 4th are arbitrary (any basis of the null space),
    so its amplification at r = 16 has no meaning and is left out; r = 4 is kept."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 32, generator=g)
    dW = torch.randn(40, 4, generator=g) @ torch.randn(4, 32, generator=g)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    assert float(S[4]) > 0  # rounding leaves nonzero values past the rank: the rule must see through them
    got = spectral.amplification(U, S, Vh, W, [1, 4, 5, 16])
    assert set(got) == {1, 4}


def test_rank_measures() -> None:
    assert spectral.ranks_for_energy(PLANTED, float(PLANTED.square().sum())) == PLANTED_RANKS
    assert spectral.ranks_for_energy(PLANTED[:3], float(PLANTED.square().sum()))["0.99"] is None  # beyond K
    assert spectral.stable_rank(PLANTED, float(PLANTED.square().sum())) == pytest.approx(85.3125 / 64)
    assert spectral.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert spectral.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert spectral.energy_curve(PLANTED, float(PLANTED.square().sum()))[-1] == pytest.approx(1.0)


# -- BASE FT ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_planted_spectrum_gives_known_ranks(tmp_path: Path, svd: str) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = {
        "layers.0.q.weight": planted_delta(64, 48, PLANTED, g),
        "layers.1.q.weight": planted_delta(40, 72, PLANTED, g),
    }

    base, ft, _ = write_pair(tmp_path, deltas, {"norm.weight": torch.ones(8, dtype=torch.float64)})
    result = analyze(base, ft, top_k=16, svd=svd, show_progress=False)  # type: ignore[arg-type]
    assert [m.module for m in result.modules] == ["layers.0.q", "layers.1.q"]
    for m in result.modules:
        assert m.rank_for_energy == PLANTED_RANKS
        # a float32 SVD is exact to a modest multiple of eps * sigma_1 (= 8): CUDA's was 1.04e-5 off
        assert m.singular_values[:6] == pytest.approx(PLANTED.tolist(), rel=1e-5, abs=4e-5)
        assert max(m.singular_values[6:]) < 1e-5  # float32 storage noise only
        assert m.stable_rank == pytest.approx(85.3125 / 64, rel=3e-5)  # / sigma_1^2: CUDA's sigma_1 was 7.5e-6 off
    assert result.summary()["by_type"]["q"]["modules"] == 2
    assert result.summary()["by_layer"].keys() == {"0", "1"}


def test_checkpoint_spectrum_and_amplification_against_exact_svd(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = {"blk.3.attn.weight": 0.1 * torch.randn(24, 36, generator=g, dtype=torch.float64)}
    base, ft, weights = write_pair(tmp_path, deltas)
    (m,) = analyze(base, ft, top_k=8, svd="exact", amplification_ranks=(2, 8), show_progress=False).modules
    dW = (weights["blk.3.attn.weight"] + deltas["blk.3.attn.weight"]).float().double() - weights["blk.3.attn.weight"]
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    assert m.singular_values == pytest.approx(S[:8].tolist(), rel=1e-5)
    assert m.norm == pytest.approx(float(torch.linalg.matrix_norm(dW)), rel=1e-6)
    assert m.rank_for_energy["0.99"] is None  # a full-rank delta needs more than 8
    for r in (2, 8):
        expected = math.sqrt(float(S[:r].square().sum())) / float(
            torch.linalg.matrix_norm(U[:, :r].T @ weights["blk.3.attn.weight"] @ Vh[:r].T)
        )
        assert m.amplification[r] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("rule", [{"energy": 0.9}, {"budget": 700}])
def test_extract_rank_is_the_rank_extract_chooses(tmp_path: Path, rule: dict) -> None:
    g = torch.Generator().manual_seed(0)
    spectra = [PLANTED, PLANTED.flip(0) ** 0.5, torch.linspace(3, 0.1, 12, dtype=torch.float64)]
    deltas = {f"layers.{i}.proj.weight": planted_delta(40, 30, s, g) for i, s in enumerate(spectra)}
    base, ft, _ = write_pair(tmp_path, deltas)
    analysis = analyze(base, ft, top_k=12, show_progress=False, **rule)
    extracted = extract(base, ft, output=tmp_path / "out", rank=12, show_progress=False, **rule)
    ranks = {m.module: m.rank for m in extracted.report}
    assert {m.module: m.extract_rank for m in analysis.modules if m.extract_rank} == ranks
    assert len(set(ranks.values())) > 1  # the rule did choose


def test_skipped_and_tied_and_selection(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = {f"layers.0.{n}.weight": planted_delta(16, 16, PLANTED[:3], g) for n in ("q", "k")}
    base, ft, _ = write_pair(tmp_path, deltas)
    result = analyze(base, ft, exclude=r"\.k$", show_progress=False)
    assert [m.module for m in result.modules] == ["layers.0.q"]
    assert [(s.key, s.reason) for s in result.skipped] == [("layers.0.k.weight", "not selected")]


# -- adapters -------------------------------------------------------------------------------------------------
def random_adapter(path: Path, ranks: dict[str, int], seed: int, alpha: float = 8.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter()
    adapter.modules = {
        name: LoraModule(torch.randn(r, 32, generator=g), torch.randn(48, r, generator=g), alpha=alpha)
        for name, r in ranks.items()
    }
    save_adapter(adapter, path)
    return load_adapter(path)


def test_adapter_spectrum_from_factors_equals_the_dense_svd(fixtures: Path) -> None:
    adapter = load_adapter(fixtures / "llama-peft-adapter")
    result = analyze(fixtures / "llama-peft-adapter", show_progress=False)
    assert result.mode == "adapter" and len(result.modules) == len(adapter.modules)
    for m in result.modules:
        lm = adapter.modules[m.module]
        dense = torch.linalg.svdvals(lm.scaling * lm.lora_B.double() @ lm.lora_A.double())[: lm.rank]
        assert m.singular_values == pytest.approx(dense.tolist(), rel=1e-10, abs=1e-12)
        assert m.rank == lm.rank
        assert m.effective_rank == pytest.approx(spectral.effective_rank(dense), rel=1e-9)
        assert m.amplification == {}  # no --base


def test_adapter_amplification_with_base(fixtures: Path) -> None:
    from loratool.io.checkpoint import open_checkpoint

    result = analyze(fixtures / "llama-peft-adapter", base=fixtures / "llama-base", show_progress=False)
    adapter = load_adapter(fixtures / "llama-peft-adapter")
    with open_checkpoint(fixtures / "llama-base") as ck:
        for m in result.modules:
            lm = adapter.modules[m.module]
            dW = lm.scaling * lm.lora_B.double() @ lm.lora_A.double()
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            W = ck.get(m.module + ".weight").double()
            r = 1
            expected = float(S[0]) / float(torch.linalg.matrix_norm(U[:, :r].T @ W @ Vh[:r].T))
            assert m.amplification[1] == pytest.approx(expected, rel=1e-8)


def test_two_adapters_subspace_similarity(tmp_path: Path) -> None:
    names = {
        "model.layers.0.self_attn.q_proj": 8,
        "model.layers.1.self_attn.q_proj": 8,
        "model.layers.0.mlp.up_proj": 8,
    }
    one = random_adapter(tmp_path / "r8", names, seed=0)
    other = random_adapter(tmp_path / "r4", {n: 4 for n in list(names)[:2]}, seed=1)
    result = analyze(tmp_path / "r8", tmp_path / "r4", show_progress=False)
    assert result.mode == "adapters"
    assert result.only_in[str(tmp_path / "r8")] == ["model.layers.0.mlp.up_proj"]
    for m in result.modules:
        if m.module not in other.modules:
            assert m.subspace_similarity is None
            continue
        phi = m.subspace_similarity
        assert phi is not None and (len(phi), len(phi[0])) == (8, 4)
        A1, A2 = one.modules[m.module].lora_A, other.modules[m.module].lora_A
        assert phi[7][3] == pytest.approx(phi_by_definition(A1, A2, 8, 4), abs=1e-12)
        assert phi[0][0] == pytest.approx(phi_by_definition(A1, A2, 1, 1), abs=1e-12)
    by_type = result.summary()["by_type"]["self_attn.q_proj"]
    assert by_type["modules"] == 2 and 0 <= by_type["mean_phi"] <= 1


def test_an_adapter_against_itself_is_similar(tmp_path: Path) -> None:
    random_adapter(tmp_path / "a", {"layers.0.q": 6}, seed=0)
    (m,) = analyze(tmp_path / "a", tmp_path / "a", show_progress=False).modules
    assert [m.subspace_similarity[i][i] for i in range(6)] == pytest.approx([1.0] * 6)


def test_inputs_of_mixed_kinds_are_refused(fixtures: Path) -> None:
    with pytest.raises(LoraToolError, match="one input is an adapter and the other a checkpoint"):
        analyze(fixtures / "llama-peft-adapter", fixtures / "llama-base", show_progress=False)
    with pytest.raises(LoraToolError, match="one checkpoint alone"):
        analyze(fixtures / "llama-base", show_progress=False)


def test_an_invalid_adapter_is_refused_as_the_other_commands_refuse_it(tmp_path: Path, fixtures: Path, cli) -> None:
    """An adapter validate rejects (here int32 factors, which analyze had read as integers: a down_proj
    whose values truncate to zero showed a spectrum of zeros) is refused, first or second, exit 1."""
    import shutil

    from safetensors.torch import load_file

    bad = tmp_path / "bad"
    shutil.copytree(fixtures / "llama-peft-adapter", bad)
    file = bad / "adapter_model.safetensors"
    ts = load_file(str(file))
    key = next(k for k in sorted(ts) if k.endswith("lora_A.weight"))
    ts[key] = ts[key].to(torch.int32)
    save_file(ts, str(file), metadata={"format": "pt"})
    for args in ((bad,), (fixtures / "llama-peft-adapter", bad)):
        res = cli("analyze", *args, "--json")
        assert res.exit_code == 1 and "not valid, so analyze refuses it" in res.stderr and key in res.stderr
        assert res.stdout == ""


def test_an_infinite_amplification_is_null_in_json_and_inf_in_text(tmp_path: Path, fixtures: Path, cli) -> None:
    """A base weight with nothing in the update's subspace (here all zeros) has an infinite amplification
    factor: null in --json (which cannot spell infinity; the command had failed as a loratool bug), "inf"
    in the text and the report; an integer base weight is refused as merge refuses it."""
    import shutil

    from helpers import edit_tensors

    key = "model.layers.0.self_attn.q_proj.weight"
    base = tmp_path / "base"
    shutil.copytree(fixtures / "llama-base", base)
    edit_tensors(base / "model.safetensors", lambda ts: ts[key].zero_())
    adapter = fixtures / "llama-peft-adapter"
    res = cli("analyze", adapter, "--base", base, "--json")
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    amp = {m["module"]: m["amplification"] for m in d["modules"]}
    assert amp["model.layers.0.self_attn.q_proj"] == {"1": None, "4": None}
    assert all(a is not None and a > 0 for a in amp["model.layers.1.self_attn.q_proj"].values())
    assert d["summary"]["by_type"]["self_attn.q_proj"]["median_amplification"]["1"] is None  # inf among two
    text = cli("analyze", adapter, "--base", base)
    assert text.exit_code == 0 and "inf" in next(
        ln for ln in text.output.splitlines() if "layers.0.self_attn.q_proj" in ln
    )
    res = cli("analyze", adapter, "--base", base, "--report", tmp_path / "r.html")
    assert res.exit_code == 0 and "1: inf, 4: inf" in (tmp_path / "r.html").read_text()
    edit_tensors(base / "model.safetensors", lambda ts: ts.update({key: ts[key].to(torch.int8)}))
    res = cli("analyze", adapter, "--base", base, "--json")
    assert res.exit_code == 1 and "not floating point" in res.stderr and key in res.stderr


# -- the report and the command line ----------------------------------------------------------------------
def test_report_is_self_contained_html_with_plots(tmp_path: Path, fixtures: Path, cli) -> None:
    out = tmp_path / "report.html"
    before = file_digest(fixtures / "llama-ft")
    res = cli("analyze", fixtures / "llama-base", fixtures / "llama-ft", "--report", out, "-q")
    assert res.exit_code == 0, res.output
    text = out.read_text()
    images = text.split('src="data:image/png;base64,')[1:]
    assert len(images) == 3  # energy and spectrum, rank heatmap, amplification (phi needs two adapters)
    for image in images:
        assert base64.b64decode(image.split('"')[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "http://" not in text and "https://" not in text and "<script" not in text  # nothing links out
    assert "model.layers.1.mlp.up_proj" in text
    assert file_digest(fixtures / "llama-ft") == before
    again = cli("analyze", fixtures / "llama-base", fixtures / "llama-ft", "--report", out, "-q")
    assert again.exit_code == 1 and "--force" in again.output


def test_phi_report_for_two_adapters(tmp_path: Path, cli) -> None:
    random_adapter(tmp_path / "a", {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.self_attn.q_proj": 8}, 0)
    random_adapter(tmp_path / "b", {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 4}, 1)
    res = cli("analyze", tmp_path / "a", tmp_path / "b", "--report", tmp_path / "phi.html", "-q")
    assert res.exit_code == 0, res.output
    assert "Subspace similarity" in (tmp_path / "phi.html").read_text()


def test_report_reads_as_a_person_reads_it(tmp_path: Path, fixtures: Path) -> None:
    """Integer axes carry integer ticks; a rank beyond the computed singular values is written the same
    way in tables and heatmaps; the raw spectrum is plotted on a log scale beside the energy curve."""
    from loratool.analysis import plots

    result = analyze(fixtures / "llama-base", fixtures / "llama-ft", top_k=2).to_json()
    modules = result["modules"]
    assert any(m["rank_for_energy"]["0.99"] is None for m in modules)  # beyond top-k: the case at hand
    energy, spectrum = plots._energy_and_spectrum(modules).axes
    assert spectrum.get_yscale() == "log" and "sigma" in spectrum.get_ylabel()
    heatmap = plots._rank_heatmap(modules, 2)
    for axis in (energy.xaxis, spectrum.xaxis, *(ax.yaxis for ax in heatmap.axes if ax.get_label() == "<colorbar>")):
        ticks = [t for t in axis.get_ticklocs() if axis.get_view_interval()[0] <= t <= axis.get_view_interval()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    labels = {t.get_text() for ax in heatmap.axes for t in ax.texts}
    assert ">2" in labels
    out = plots.write_report(result, tmp_path / "r.html")
    text = out.read_text()
    assert "&gt;2" in text and "&gt;K" not in text


def test_two_adapter_report_says_which_adapter_each_plot_shows(tmp_path: Path) -> None:
    from loratool.analysis import plots

    random_adapter(tmp_path / "chat", {"model.layers.0.self_attn.q_proj": 8}, 0)
    random_adapter(tmp_path / "code", {"model.layers.0.self_attn.q_proj": 4}, 1)
    result = analyze(tmp_path / "chat", tmp_path / "code").to_json()
    text = plots.write_report(result, tmp_path / "r.html").read_text()
    assert (
        text.count(f"Of the first adapter, {tmp_path / 'chat'}.") == 2
    )  # energy and ranks (no --base: no amplification)
    assert f"spectra, ranks and amplification of the first adapter, {tmp_path / 'chat'}" in text
    phi = plots._phi_heatmaps(result["modules"], ["chat", "code"])
    assert phi.axes[0].get_ylabel() == "i (chat)" and phi.axes[0].get_xlabel() == "j (code)"


def test_report_without_matplotlib_says_how_to_install(tmp_path: Path, fixtures: Path, monkeypatch, cli) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    res = cli("analyze", fixtures / "llama-base", fixtures / "llama-ft", "--report", tmp_path / "r.html", "-q")
    assert res.exit_code == 1
    assert "pip install 'loratool[plot]'" in res.output
    assert not (tmp_path / "r.html").exists()


def test_json_contract(fixtures: Path, cli) -> None:
    res = cli("analyze", fixtures / "llama-base", fixtures / "llama-ft", "--json", "-q", "--amplification", "2,4")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["mode"] == "checkpoints" and d["top_k"] == 64
    for m in d["modules"]:
        assert {"module", "shape", "singular_values", "rank_for_energy", "stable_rank", "amplification"} <= m.keys()
        assert set(m["rank_for_energy"]) == {"0.5", "0.9", "0.99"}
        assert set(m["amplification"]) == {"2", "4"}
    assert d["summary"]["by_type"] and d["summary"]["by_layer"]


@pytest.mark.parametrize(
    "args",
    [["--amplification", "4,x"], ["--amplification", "0"], ["--top-k", "0"], ["--energy", "0.9", "--budget", "10"]],
)
def test_usage_errors(fixtures: Path, cli, args: list[str]) -> None:
    res = cli("analyze", fixtures / "llama-base", fixtures / "llama-ft", *args)
    assert res.exit_code == 2, res.output


def test_a_report_another_run_wrote_meanwhile_is_not_replaced(tmp_path: Path, fixtures: Path, monkeypatch, cli) -> None:
    """Two runs to one report: the one that finishes second exits 1 and leaves the first's file
    (it used to replace it with exit 0); with --force it replaces it."""
    from loratool.analysis import plots

    out = tmp_path / "report.html"
    real_html = plots._html

    def another_run_finishes_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not out.exists():
            out.write_text("the other run's report")
        return real_html(*args, **kwargs)

    monkeypatch.setattr(plots, "_html", another_run_finishes_first)
    res = cli("analyze", fixtures / "llama-base", fixtures / "llama-ft", "--report", out, "-q")
    assert res.exit_code == 1 and "another run wrote it first" in res.stderr, res.stderr
    assert out.read_text() == "the other run's report"
    assert not [p for p in tmp_path.iterdir() if p.name != "report.html"]  # no temporary left
    res = cli("analyze", fixtures / "llama-base", fixtures / "llama-ft", "--report", out, "-q", "--force")
    assert res.exit_code == 0 and out.read_text().startswith("<!DOCTYPE html>"), res.stderr
