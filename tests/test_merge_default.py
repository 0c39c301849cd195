"""The default merge (the collaborators' exact mean within a tolerance), the cross-validated
projection, and order and seed invariance of every per-adapter result."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import lora_config, write_adapter
from safetensors.torch import load_file
from typer.testing import CliRunner

from benchmarks.synthetic import make_module
from clair_cli import pipeline
from clair_cli.cli import app
from clair_cli.core.baselines import mean
from clair_cli.core.lowrank import rank_for_tolerance, truncate_factored
from clair_cli.core.order import content_order, inverse
from clair_cli.core.projection import folds_for, projection_rank
from clair_cli.io.sources import open_adapters
from clair_cli.params import AuditParams, MergeOptions

SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"


def dense(A, B, s) -> torch.Tensor:
    return torch.stack([float(sk) * b.double() @ a.double() for a, b, sk in zip(A, B, s, strict=True)])


@pytest.mark.parametrize("tol", [0.0, 1e-6, 1e-3, 0.05, 0.3])
def test_tolerance_gives_the_smallest_rank_within_it(tol: float) -> None:
    A, B, s, _ = make_module(K=6, ranks=[2, 4, 3, 4, 5, 1], noise=0.5, seed=2)
    want = dense(A, B, s).mean(0)
    res = mean(A, B, s, tol=tol)
    got = res.B.double() @ res.A.double()
    err = float((got - want).norm() / want.norm())
    assert err <= tol + 1e-12 and abs(err - res.info["truncation_error"]) < 1e-9
    sv = torch.linalg.svdvals(want)
    energy = sv.square()
    kept = res.rank
    # One rank fewer would break the tolerance (the smallest such rank).
    if kept > 1:
        assert float(energy[kept - 1 :].sum().sqrt() / energy.sum().sqrt()) > tol
    assert rank_for_tolerance(sv, tol) == kept or tol == 0.0


def test_rank_for_tolerance_edges() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_tolerance(s, 0.0) == 3
    assert rank_for_tolerance(s, 0.99) == 1
    assert rank_for_tolerance(torch.zeros(3), 0.1) == 1
    with pytest.raises(ValueError):
        rank_for_tolerance(s, 1.0)
    a, b, err = truncate_factored(torch.randn(5, 7, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), 2)
    assert a.shape == (2, 7) and b.shape == (6, 2) and 0 < err < 1


def _dense_cv(T: torch.Tensor, folds, q_max: int) -> tuple[list[float], float]:
    """Dense reference of the cross-validated error of P_q m against held-out updates."""
    errors = [0.0] * q_max
    plain = 0.0
    total = 0.0
    K = T.shape[0]
    for held in folds:
        train = [k for k in range(K) if k not in held]
        m = T[train].mean(0)
        Y = torch.cat([t / t.norm() for t in T[train]], dim=1)
        U = torch.linalg.svd(Y, full_matrices=False)[0]
        for k in held:
            w = 1 / len(held)
            total += w * float(T[k].square().sum())
            plain += w * float((m - T[k]).square().sum())
            for q in range(1, q_max + 1):
                Uq = U[:, : min(q, Y.shape[1])]
                errors[q - 1] += w * float((Uq @ (Uq.T @ m) - T[k]).square().sum())
    return [e / total for e in errors], plain / total


@pytest.mark.parametrize("side", ["out", "in"])
def test_projection_cv_matches_a_dense_reference(side: str) -> None:
    A, B, s, _ = make_module(K=7, ranks=[2, 3, 2, 4, 3, 2, 3], noise=0.6, d_out=20, d_in=14, seed=5)
    T = dense(A, B, s)
    if side == "in":
        T = T.transpose(1, 2)
    folds = folds_for(list(range(7)))
    choice = projection_rank(A, B, s, folds, side=side, max_rank=12)
    errors, plain = _dense_cv(T, folds, 12)
    torch.testing.assert_close(torch.tensor(choice.errors), torch.tensor(errors), rtol=1e-7, atol=1e-9)
    assert abs(choice.unprojected - plain) < 1e-9
    best = min(range(12), key=errors.__getitem__)
    assert choice.rank == (best + 1 if errors[best] < plain else None)


def test_projection_helps_where_noise_lies_outside_a_shared_subspace() -> None:
    # Benign updates in a rank-2 output space plus large independent noise: projecting the mean
    # onto the shared directions removes noise and predicts held-out adapters better.
    A, B, s, _ = make_module(K=12, r=2, noise=1.5, d_out=48, seed=1, spread=0.3)
    shared = projection_rank(A, B, s, folds_for(list(range(12))))
    assert shared.rank == 2 and shared.errors[1] < shared.unprojected
    # Independent adapters: the others' mean says nothing about a held-out one (errors near 1,
    # the held-out update's own energy); projection only shrinks it towards zero.
    A, B, s, _ = make_module(K=12, kind="independent", d_out=48, seed=1)
    independent = projection_rank(A, B, s, folds_for(list(range(12))))
    assert min(independent.errors) > 0.99 and independent.unprojected > 1.0


def test_folds_are_leave_one_out_for_small_pools_and_cover_everyone() -> None:
    assert folds_for([2, 0, 1]) == [[2], [0], [1]]
    folds = folds_for(list(range(23)))
    assert len(folds) == 10 and sorted(k for f in folds for k in f) == list(range(23))


def test_content_order_is_a_function_of_content() -> None:
    A, B, s, _ = make_module(K=6, seed=3)
    order = content_order(A, B, s)
    perm = [4, 2, 0, 5, 1, 3]
    permuted = content_order([A[j] for j in perm], [B[j] for j in perm], [s[j] for j in perm])
    assert [perm[j] for j in permuted] == order
    inv = inverse(order)
    assert [order[int(inv[j])] for j in range(6)] == list(range(6))


# ---------------------------------------------------------------------------------------------
# Pipeline and command line


def _shuffled_copy(src: Path, dst: Path, seed: int) -> list[str]:
    """The pool's adapters under new names in a shuffled order (directory order = name order)."""
    names = sorted(p.name for p in src.iterdir() if (p / "adapter_config.json").exists())
    order = names[:]
    random.Random(seed).shuffle(order)
    for i, name in enumerate(order):
        shutil.copytree(src / name, dst / f"a{i:02d}")
    return order


def _audit(path: Path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["audit", str(path), "--json", "-", "--exit-zero", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _by_source(report: dict, mapping: dict[str, str]) -> dict[str, dict]:
    out = {}
    for a in report["adapters"]:
        row = {k: a[k] for k in ("score", "flagged", "norm", "per_module")}
        row["reasons"] = [{k: (v if k != "text" else None) for k, v in r.items()} for r in a["reasons"]]
        out[mapping.get(a["name"], a["name"])] = row
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_permuting_the_sources_permutes_every_result_exactly(tmp_path: Path, seed: int) -> None:
    """The trained sample pool given in a shuffled order: every adapter gets bit-identical
    scores, verdicts and reasons, the modules the same ranks and spectra, and the merge the
    same tensors."""
    order = _shuffled_copy(SAMPLES, tmp_path, seed)
    mapping = {f"a{i:02d}": name for i, name in enumerate(order)}
    base = _audit(SAMPLES)
    shuffled = _audit(tmp_path)
    assert _by_source(shuffled, mapping) == _by_source(base, {})
    assert shuffled["shared_rank"] == base["shared_rank"] and shuffled["modules"] == base["modules"]
    assert sorted(mapping[n] for n in shuffled["flagged"]) == sorted(base["flagged"])

    merged = {}
    for tag, path in {"given": SAMPLES, "shuffled": tmp_path}.items():
        out = tmp_path.parent / f"merged-{seed}-{tag}"
        result = CliRunner().invoke(app, ["merge", str(path), "--out", str(out), "--exit-zero", "--quiet"])
        assert result.exit_code == 0, result.output
        merged[tag] = load_file(out / "adapter_model.safetensors")
    assert merged["given"].keys() == merged["shuffled"].keys()
    assert all(torch.equal(merged["given"][k], merged["shuffled"][k]) for k in merged["given"])


def test_verdicts_do_not_depend_on_the_seed() -> None:
    flagged = {tuple(_audit(SAMPLES, "--seed", str(seed))["flagged"]) for seed in range(4)}
    assert len(flagged) == 1


def write_pool(root: Path, K: int, noise: float, boost: dict[int, float] | None = None) -> Path:
    """K adapters of 4 modules sharing a rank-2 output space per module, adapter k's B times
    ``boost[k]``."""
    boost = boost or {}
    mods = {f"model.layers.{i}.self_attn.{p}": (16, 12) for i in range(2) for p in ("q_proj", "v_proj")}
    per_module = {m: make_module(K=K, d_out=16, d_in=12, noise=noise, seed=j) for j, m in enumerate(mods)}
    for k in range(K):
        tensors = {}
        for m, (A, B, _s, _U) in per_module.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = A[k].float().contiguous()
            tensors[f"base_model.model.{m}.lora_B.weight"] = boost.get(k, 1.0) * B[k].float().contiguous()
        write_adapter(root / f"c{k}", tensors, lora_config(target_modules=["q_proj", "v_proj"]))
    return root


@pytest.fixture(scope="module")
def clean_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six benign adapters sharing a rank-2 output space per module (nothing to flag)."""
    return write_pool(tmp_path_factory.mktemp("clean"), 6, 0.05)


def test_with_nothing_flagged_the_merge_is_the_mean_bit_for_bit(clean_pool: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    outs = {}
    for method in ("clair", "mean"):
        out = tmp_path / method
        result = runner.invoke(app, ["merge", str(clean_pool), "--out", str(out), "--method", method])
        assert result.exit_code == 0, result.output
        outs[method] = load_file(out / "adapter_model.safetensors")
    assert outs["clair"].keys() == outs["mean"].keys()
    assert all(torch.equal(outs["clair"][k], outs["mean"][k]) for k in outs["clair"])


def test_library_merge_reports_rank_error_and_projection(clean_pool: Path) -> None:
    pool = pipeline.build_pool(open_adapters([str(clean_pool)]))
    settings = AuditParams(device="cpu")
    outcome = pipeline.audit(pool, settings)
    assert outcome.auditor.collaborative_set_ == list(range(6))
    plain = pipeline.merge(pool, "clair", settings, outcome=outcome)
    summary = plain.summary()
    assert summary["max_relative_error"] <= 1e-3 and "projection_rank" not in summary
    projected = pipeline.merge(pool, "clair", settings, options=MergeOptions(project=True), outcome=outcome)
    ranks = projected.summary()["projection_rank"]
    assert set(ranks) == set(pool.modules)
    fixed = pipeline.merge(pool, "clair", settings, options=MergeOptions(project=True, project_rank=2), outcome=outcome)
    assert set(fixed.summary()["projection_rank"].values()) == {2} and {r.rank for r in fixed.modules.values()} == {2}
    rescaled = pipeline.merge(pool, "clair", settings, options=MergeOptions(rescale="norm"), outcome=outcome)
    assert rescaled.scale > 1  # the mean of partly independent updates is shorter than they are
    for m, r in rescaled.modules.items():
        torch.testing.assert_close(r.B @ r.A, rescaled.scale * (plain.modules[m].B @ plain.modules[m].A))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merge-rank", "0"], "--merge-rank 0"),
        (["--merge-tol", "1.5"], "--merge-tol 1.5"),
        (["--project-rank", "0"], "--project-rank 0"),
        (["--rescale", "up"], "'up' is not one of"),
        (["--method", "mean", "--project"], "--project"),
        (["--method", "mean", "--norm-bound", "1.5"], "--norm-bound shape the clair merge"),
        (["--norm-bound", "none"], "--norm-bound none: expected a number of at least 1"),
        (["--norm-bound", "inf"], "--norm-bound inf"),
        (["--norm-bound", "1_5"], "--norm-bound 1_5: expected a number of at least 1 (times the median norm), or off"),
        (["--norm-bound", "0.5"], "--norm-bound 0.5: expected a number of at least 1 (times the median norm), or off"),
    ],
)
def test_bad_merge_options_exit_2(clean_pool: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["merge", str(clean_pool), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "o").exists()


def test_norm_bound_is_on_by_default_and_off_on_request(tmp_path: Path) -> None:
    """`clair merge` bounds norms at 1.5x by default (a client at 3x its norm, under the norm
    rule's 4x floor, weighted down and named in a note); `--norm-bound off` merges the plain mean
    of the collaborators; a baseline runs without a bound, and accepts `--norm-bound off`."""
    pool = write_pool(tmp_path / "pool", 10, 0.3, {9: 3.0})
    runner = CliRunner()
    reports, outputs = {}, {}
    for name, args in {"default": [], "off": ["--norm-bound", "off"], "mean": ["--method", "mean"]}.items():
        out = tmp_path / name
        result = runner.invoke(
            app, ["merge", str(pool), "--out", str(out), "--json", str(tmp_path / f"{name}.json"), "--exit-zero", *args]
        )
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["merge"]
        outputs[name] = " ".join(result.output.split())  # the console wraps its notes
    assert reports["default"]["options"]["norm_bound"] == 1.5 and "weighted down to it: c9" in outputs["default"]
    assert reports["default"]["norm_bounded"] and reports["off"]["options"]["norm_bound"] is None
    assert "norm_bounded" not in reports["off"] and reports["mean"]["options"]["norm_bound"] is None
    assert 1.5 <= reports["default"]["norm_bound_relative"] <= 3.0 and "norm_bound_relative" not in reports["off"]
    cards = {name: (tmp_path / name / "README.md").read_text() for name in reports}  # the model cards say so too
    assert "- norm bound (--norm-bound): 1.5x the collaborators' median norm" in cards["default"]
    assert "1 update(s) weighted down to it over all modules" in cards["default"]
    assert "- norm bound: off" in cards["off"] and "norm bound" not in cards["mean"]
    result = runner.invoke(
        app, ["merge", str(pool), "--out", str(tmp_path / "m2"), "--method", "mean", "--norm-bound", "off"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("solver", ["convex", "fast"])
def test_auditor_is_permutation_equivariant_on_both_paths(solver: str) -> None:
    from benchmarks.synthetic import make_pool
    from clair_cli.core.audit import ClairAuditor, ModuleInput

    K = 24
    mods = make_pool(M=2, K=K, bad=(3, 17, 20), noise=0.3, ranks=[8] * K, d_out=96, d_in=40)
    perm = list(range(K))
    random.Random(7).shuffle(perm)  # position p of the permuted pool holds adapter perm[p]
    permuted = [
        ModuleInput(m.name, list(range(K)), [m.A[j] for j in perm], [m.B[j] for j in perm], [m.scales[j] for j in perm])
        for m in mods
    ]
    a = ClairAuditor(solver=solver).fit(mods, K)
    b = ClairAuditor(solver=solver).fit(permuted, K)
    assert a.shared_rank_ == b.shared_rank_
    for p, k in enumerate(perm):
        va, vb = a.verdicts_[k], b.verdicts_[p]
        fields = ("score", "flagged", "per_module", "norm_ratio")
        assert [getattr(va, f) for f in fields] == [getattr(vb, f) for f in fields]
        assert [r.kind for r in va.reasons] == [r.kind for r in vb.reasons]
    assert {k for k in range(K) if a.flagged_[k]} == {3, 17, 20}


def test_gate_thresholds_come_from_held_out_reference_shares() -> None:
    """With 6 trusted references from the sample pool, candidates are scored against a subspace
    they did not shape; so are the references that set the thresholds (each against the other
    five). In-sample reference shares flagged 9 of 12 honest candidates over the two splits;
    with held-out shares and thresholds calibrated for six references none is flagged, and
    every contaminated candidate is caught."""
    refs_a = [f"client_{k:02d}" for k in range(1, 7)]
    refs_b = [f"client_{k:02d}" for k in range(7, 13)]
    bad = [f"client_{k}" for k in range(13, 17)]
    honest_flags = caught = 0
    for refs, cands in ((refs_a, refs_b), (refs_b, refs_a)):
        args = ["gate", *[str(SAMPLES / c) for c in cands + bad]]
        for r in refs:
            args += ["--reference", str(SAMPLES / r)]
        result = CliRunner().invoke(app, [*args, "--json", "-", "--exit-zero", "--quiet"])
        assert result.exit_code == 0, result.output
        flagged = set(json.loads(result.stdout)["flagged"])
        assert not flagged & set(refs)
        honest_flags += len(flagged & set(cands))
        caught += len(flagged & set(bad))
    assert honest_flags == 0 and caught == 8


def test_the_card_says_when_the_norm_bound_was_not_applied() -> None:
    """With fewer than three collaborators there is no median to bound by: the card says so
    instead of stating a bound (the JSON's norm_bound_relative is null)."""
    from clair_cli.report.card import _influence_lines

    merge = {"method": "clair", "options": {"norm_bound": 1.5, "clip": None}, "norm_bound_relative": None}
    assert _influence_lines(merge) == ["- norm bound (--norm-bound 1.5): not applied, fewer than three collaborators"]
    merge |= {"norm_bound_relative": 2.25, "norm_bounded": {"3": 0.5}, "module_norm_bounded": {}}
    assert "here 2.25x); 1 update(s) weighted down" in _influence_lines(merge)[0]
