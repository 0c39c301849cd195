"""What ``clair refine`` writes and what the audit reports per module, against formulas written here.

Independent of clair's arithmetic, as tests/test_merge_review.py is for ``clair merge``: every
input and every refined adapter is loaded with ``PeftModel.from_pretrained`` on a tiny Llama,
each module's update is PEFT's own ``scaling * B @ A``, and the expected numbers are computed
here in numpy from the docs:

- refined update (docs/usage/merge.md, "clair refine"; docs/engine.md, section 6):
  ``U_q U_q^T Theta_k`` (``--side in``: ``Theta_k V_q V_q^T``), ``U_q`` the leading ``q`` left
  singular vectors of the collaborators' unit-norm updates side by side, ``q`` the report's
  ``refine.projection_rank`` (null: the module unchanged); only ``B`` changes (``A`` with
  ``--side in``); flagged adapters get no output;
- ``per_module`` (the off-subspace share): ``||(I - U U^T) Theta_k|| / ||Theta_k||``, ``U`` the
  leading ``shared_rank`` directions of the unit-norm updates of the adapters that fitted it
  (all but the report's ``refit.without``);
- ``modules[].spectrum``: the singular values of the unit-norm stack of the adapters that fitted it;
- ``norm``: ``||Theta_k||`` (all modules) over the median norm of the other adapters not flagged.

And the review's finding: the projection rank chosen by cross-validation of the projected *mean*
went below the shared rank, so refine removed each collaborator's own variation inside the shared
subspace (noiseless adapters lying in it changed by up to 97 %; in the spec's model the refined
adapters were 2.5x further from the truth than the local ones), and it projected modules with no
shared structure onto one direction. Now never below the detected shared rank, and a module of
shared rank 0 is kept as it is.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_llama
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from test_merge_review import tiny_config
from typer.testing import CliRunner

from clair_cli.cli import app

H = 32
MODS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
RECIPES = ((2, 4.0, False), (4, 8.0, False), (3, 6.0, True))  # (r, alpha, rslora) by index, with --mixed


def write_pool(  # noqa: PLR0913 - the pool's recipe
    root: Path,
    K: int,
    seed: int,
    bad: tuple[int, ...] = (),
    noise: float = 0.05,
    mixed: bool = False,
    independent: tuple[str, ...] = (),
    dtype: torch.dtype = torch.float32,
) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    """Benign adapters' ``B`` in a rank-2 column space per module (``bad`` and every adapter on the
    ``independent`` modules: random), plus ``noise``; returns the names and each module's noiseless
    updates ``s B_true A`` (the truth of the spec's model)."""
    g = torch.Generator().manual_seed(seed)
    shared = {m: torch.linalg.qr(torch.randn(H, 2, generator=g, dtype=torch.float64))[0] for m in MODS}
    names, truth = [], {m: [] for m in MODS}
    for i in range(K):
        r, alpha, rslora = RECIPES[i % 3] if mixed else (4, 8.0, False)
        s = alpha / r**0.5 if rslora else alpha / r
        t = {}
        for m in MODS:
            if i in bad or m in independent:
                b_true = torch.randn(H, r, generator=g, dtype=torch.float64)
            else:
                b_true = shared[m] @ torch.randn(2, r, generator=g, dtype=torch.float64)
            A = torch.randn(r, H, generator=g, dtype=torch.float64) / 4
            B = b_true + noise * torch.randn(H, r, generator=g, dtype=torch.float64)
            truth[m].append((s * b_true @ A).numpy())
            t[f"base_model.model.{m}.lora_A.weight"] = A.to(dtype).contiguous()
            t[f"base_model.model.{m}.lora_B.weight"] = B.to(dtype).contiguous()
        d = root / f"client_{i:02d}"
        d.mkdir(parents=True)
        save_file(t, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(tiny_config(r, alpha, rslora)))
        names.append(d.name)
    return names, truth


def peft_deltas(directory: Path) -> dict[str, np.ndarray]:
    """Each adapted module's update as PEFT loads ``directory`` (``d_out x d_in``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_llama(H), str(directory))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.scaling:
            A = layer.lora_A["default"].weight.detach().double()
            B = layer.lora_B["default"].weight.detach().double()
            out[name.removeprefix("base_model.model.")] = (layer.scaling["default"] * (B @ A)).numpy()
    return out


def updates(root: Path, names: list[str]) -> dict[str, np.ndarray]:
    deltas = [peft_deltas(root / n) for n in names]
    return {m: np.stack([d[m] for d in deltas]) for m in MODS}


def refine(*args: Any) -> dict[str, Any]:
    """``clair refine`` with the given sources and options; the JSON report."""
    out = Path(str(args[-1]))
    result = CliRunner().invoke(
        app, ["refine", *map(str, args[:-1]), "--out", str(out), "--json", f"{out}.json", "--exit-zero", "-q"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(Path(f"{out}.json").read_text())


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def leading(X: np.ndarray, used: list[int], q: int, side: str = "out") -> np.ndarray:
    """The leading ``q`` directions of the unit-norm updates ``X[used]`` side by side (``side``)."""
    units = [X[k] / np.linalg.norm(X[k]) for k in used]
    if side == "out":
        return np.linalg.svd(np.concatenate(units, axis=1))[0][:, :q]
    return np.linalg.svd(np.concatenate(units, axis=0))[2][:q].T


def projected(X: np.ndarray, k: int, used: list[int], q: int | None, side: str = "out") -> np.ndarray:
    if q is None:
        return X[k]
    U = leading(X, used, q, side)
    return U @ (U.T @ X[k]) if side == "out" else X[k] @ U @ U.T


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, np.ndarray]]:
    """Nine adapters of mixed ranks, alphas and rsLoRA sharing a rank-2 column space, two of them off it."""
    root = tmp_path_factory.mktemp("refine-review") / "pool"
    names, _ = write_pool(root, K=9, seed=3, bad=(2, 5), mixed=True)
    return root, names, updates(root, names)


def _check_refined(root: Path, out: Path, report: dict[str, Any], names, X, side: str) -> None:
    used = [names.index(n) for n in report["collaborative_set"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(report["collaborative_set"])  # flagged: no output
    for n in report["collaborative_set"]:
        k = names.index(n)
        got = peft_deltas(out / n)
        assert set(got) == set(MODS)
        for m in MODS:
            want = projected(X[m], k, used, report["refine"]["projection_rank"][m], side)
            assert rel(got[m], want) < 1e-5, (n, m)
        assert json.loads((out / n / "adapter_config.json").read_text()) == json.loads(
            (root / n / "adapter_config.json").read_text()
        )
        source, refined = (
            load_file(root / n / "adapter_model.safetensors"),
            load_file(out / n / "adapter_model.safetensors"),
        )
        kept = "lora_A" if side == "out" else "lora_B"
        assert set(source) == set(refined)
        for key in source:
            assert refined[key].dtype == source[key].dtype
            if kept in key:
                assert torch.equal(refined[key], source[key]), key


def test_a_refined_adapter_is_its_update_projected_on_the_collaborators_subspace(pool, tmp_path: Path) -> None:
    root, names, X = pool
    report = refine(root, tmp_path / "r")
    assert report["flagged"] == ["client_02", "client_05"]
    ranks = report["refine"]["projection_rank"]
    assert all(ranks[m] is not None and ranks[m] >= report["shared_rank"][m] for m in MODS)
    _check_refined(root, tmp_path / "r", report, names, X, "out")
    some = report["collaborative_set"][0]
    assert rel(peft_deltas(tmp_path / "r" / some)[MODS[0]], X[MODS[0]][names.index(some)]) > 0.01  # it moved


@pytest.mark.parametrize(("side", "q"), [("out", "3"), ("in", "3")])
def test_a_fixed_projection_rank_on_either_side(side: str, q: str, pool, tmp_path: Path) -> None:
    root, names, X = pool
    report = refine(root, "--side", side, "--project-rank", q, tmp_path / "r")
    assert set(report["refine"]["projection_rank"].values()) == {int(q)}
    _check_refined(root, tmp_path / "r", report, names, X, side)


def test_the_audit_s_numbers_per_module(pool, tmp_path: Path) -> None:
    """per_module shares, the spectrum and the norm ratio, from dense updates."""
    root, names, X = pool
    report = refine(root, tmp_path / "r")
    assert report["refit"]["modules"] == len(MODS)  # two flagged in the fit: refitted without them
    fit = [k for k, n in enumerate(names) if n not in report["refit"]["without"]]
    for module in report["modules"]:
        m = module["name"]
        # the stack of the adapters that fitted it: a refitted module's without the flagged
        s = np.linalg.svd(np.concatenate([X[m][k] / np.linalg.norm(X[m][k]) for k in fit], axis=1), compute_uv=False)
        assert np.abs(np.array(module["spectrum"]) - s[: len(module["spectrum"])]).max() < 1e-5
        assert module["rank"] == report["shared_rank"][m] == 2
    norms = np.sqrt(sum(np.linalg.norm(X[m], axis=(1, 2)) ** 2 for m in MODS))
    flagged = {names.index(n) for n in report["flagged"]}
    for a in report["adapters"]:
        k = names.index(a["name"])
        for m, share in a["per_module"].items():
            U = leading(X[m], fit, report["shared_rank"][m])
            want = np.linalg.norm(X[m][k] - U @ (U.T @ X[m][k])) / np.linalg.norm(X[m][k])
            assert abs(share - want) < 2e-6, (a["name"], m)
        others = [j for j in range(len(names)) if j != k and j not in flagged]
        assert abs(a["norm"] - norms[k] / np.exp(np.median(np.log(norms[others])))) < 2e-6 * a["norm"]


# ---- the bug: projection ranks below the shared rank ---------------------------------------


def test_adapters_lying_in_the_shared_subspace_are_refined_to_themselves(tmp_path: Path) -> None:
    """Noiseless: every update lies in the rank-2 shared subspace (share off it 0), so
    ``U U^T Theta_k = Theta_k``. The cross-validated rank of the mean was 1: up to 97 % removed."""
    names, _ = write_pool(tmp_path / "pool", K=8, seed=4, noise=0.0)
    X = updates(tmp_path / "pool", names)
    report = refine(tmp_path / "pool", tmp_path / "r")
    assert report["flagged"] == [] and set(report["shared_rank"].values()) == {2}
    assert max(max(a["per_module"].values()) for a in report["adapters"]) < 1e-5
    for n in names:
        got = peft_deltas(tmp_path / "r" / n)
        for m in MODS:
            assert rel(got[m], X[m][names.index(n)]) < 1e-5, (n, m)


def test_refinement_beats_local_in_the_spec_model(tmp_path: Path) -> None:
    """Benign updates ``U Gamma_k^T + E_k`` (docs/engine.md, sections 2 and 8, claim 3): refined
    closer to the truth than the local adapters (it was 0.62 against 0.25, projected at rank 1)."""
    names, truth = write_pool(tmp_path / "pool", K=8, seed=5)
    X = updates(tmp_path / "pool", names)
    report = refine(tmp_path / "pool", tmp_path / "r")
    assert report["flagged"] == []
    local, refined = [], []
    for n in names:
        got, k = peft_deltas(tmp_path / "r" / n), names.index(n)
        for m in MODS:
            local.append(rel(X[m][k], truth[m][k]))
            refined.append(rel(got[m], truth[m][k]))
    assert np.mean(refined) < 0.5 * np.mean(local), (np.mean(refined), np.mean(local))


def test_a_module_without_shared_structure_is_kept_unchanged(tmp_path: Path) -> None:
    """Independent adapters on one module (shared rank 0: 'shares nothing beyond chance') were each
    projected onto one direction, losing 84-99 % of their update there."""
    names, _ = write_pool(tmp_path / "pool", K=8, seed=2, independent=(MODS[3],))
    X = updates(tmp_path / "pool", names)
    report = refine(tmp_path / "pool", tmp_path / "r")
    assert report["shared_rank"][MODS[3]] == 0 and report["refine"]["projection_rank"][MODS[3]] is None
    source = names[0]
    assert load_file(tmp_path / "r" / source / "adapter_model.safetensors")[
        f"base_model.model.{MODS[3]}.lora_B.weight"
    ].equal(
        load_file(tmp_path / "pool" / source / "adapter_model.safetensors")[f"base_model.model.{MODS[3]}.lora_B.weight"]
    )
    _check_refined(tmp_path / "pool", tmp_path / "r", report, names, X, "out")
    card = (tmp_path / "r" / source / "README.md").read_text()
    assert "1 module(s) kept unchanged (no shared structure" in card


# ---- invariances ---------------------------------------------------------------------------


def _numbers(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "shared_rank": report["shared_rank"],
        "projection_rank": report["refine"]["projection_rank"],
        "flagged": sorted(report["flagged"]),
        "spectrum": {m["name"]: m["spectrum"] for m in report["modules"]},
    }
    for a in report["adapters"]:
        out[a["name"]] = {"score": a["score"], "norm": a["norm"], **a["per_module"], **a["signals"]}
    return out


def _close(a: dict[str, Any], b: dict[str, Any], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key in ("shared_rank", "projection_rank", "flagged"):
            assert a[key] == b[key], key
        elif key == "spectrum":
            for m in a[key]:
                assert np.abs(np.array(a[key][m]) - np.array(b[key][m])).max() <= tol, m
        else:
            assert a[key].keys() == b[key].keys()
            for s in a[key]:
                assert abs((a[key][s] or 0) - (b[key][s] or 0)) <= tol * max(1, abs(a[key][s] or 0)), (key, s)


def _variant(src: Path, dst: Path, names: list[str], change) -> None:
    for n in names:
        (dst / n).mkdir(parents=True)
        tensors = change(n, load_file(src / n / "adapter_model.safetensors"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / n / "adapter_model.safetensors")
        (dst / n / "adapter_config.json").write_text((src / n / "adapter_config.json").read_text())


def test_refactoring_permuting_and_precision_change_nothing(tmp_path: Path) -> None:
    """(B M c, M^-1 A / c) per module, the sources in reverse order, and float64 factors against
    their float32 rounding: the same report numbers (to the JSON's rounding, or float32's) and
    the same refined updates."""
    names, _ = write_pool(tmp_path / "f64", K=8, seed=6, bad=(1, 6), dtype=torch.float64)
    _variant(tmp_path / "f64", tmp_path / "f32", names, lambda n, t: {k: v.float() for k, v in t.items()})
    g = torch.Generator().manual_seed(7)

    def refactor(n: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = dict(t)
        for m in MODS:
            a, b = f"base_model.model.{m}.lora_A.weight", f"base_model.model.{m}.lora_B.weight"
            M = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
            c = 1e3 if n == names[0] else 1.0
            t[b], t[a] = t[b] @ M * c, torch.linalg.solve(M, t[a]) / c
        return t

    _variant(tmp_path / "f64", tmp_path / "refac", names, refactor)
    runs = {
        "f64": refine(tmp_path / "f64", tmp_path / "r64"),
        "f32": refine(tmp_path / "f32", tmp_path / "r32"),
        "refac": refine(tmp_path / "refac", tmp_path / "rref"),
        "perm": refine(*[tmp_path / "f64" / n for n in reversed(names)], tmp_path / "rperm"),
    }
    assert runs["f64"]["flagged"] == ["client_01", "client_06"]
    assert [a["name"] for a in runs["perm"]["adapters"]] == list(reversed(names))
    base = _numbers(runs["f64"])
    _close(base, _numbers(runs["perm"]), 0.0)
    _close(base, _numbers(runs["refac"]), 2e-6)
    _close(base, _numbers(runs["f32"]), 2e-5)
    # the refined updates from the files in float64 (PEFT would compute them in float32), scale 8 / 4
    want = {n: file_updates(tmp_path / "r64" / n) for n in runs["f64"]["collaborative_set"]}
    for out, tol in (("rperm", 0.0), ("rref", 1e-9), ("r32", 1e-6)):
        for n, updates_of in want.items():
            got = file_updates(tmp_path / out / n)
            for m in MODS:
                assert rel(got[m], updates_of[m]) <= tol, (out, n, m, rel(got[m], updates_of[m]))


def file_updates(directory: Path, scale: float = 2.0) -> dict[str, np.ndarray]:
    t = {k: v.double() for k, v in load_file(directory / "adapter_model.safetensors").items()}
    return {
        m: scale * (t[f"base_model.model.{m}.lora_B.weight"] @ t[f"base_model.model.{m}.lora_A.weight"]).numpy()
        for m in MODS
    }


# ---- the output directory ------------------------------------------------------------------


def test_an_existing_output_directory(pool, tmp_path: Path) -> None:
    root, _, _ = pool
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["refine", str(root), "--out", str(out), "--exit-zero", "-q"]
    assert CliRunner().invoke(app, args).exit_code == 2
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 2  # not clair's: left as it is
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert CliRunner().invoke(app, args).exit_code == 2  # an existing directory, even empty: only with --force
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
    assert CliRunner().invoke(app, args).exit_code == 2
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0  # refined adapters clair wrote: replaced
    assert len(list(out.iterdir())) == 7


# ---- clair inspect's per-module scale ------------------------------------------------------


@pytest.mark.parametrize(
    ("rslora", "ranks", "rank_pattern", "alpha_pattern"),
    [
        (True, {MODS[2]: 2}, {MODS[2]: 2}, {"v_proj": 3}),
        (False, {MODS[0]: 3, MODS[2]: 3}, {"q_proj": 3}, {"layers.0.self_attn.v_proj": 5}),
    ],
)
def test_inspect_reports_the_scale_peft_applies(rslora, ranks, rank_pattern, alpha_pattern, tmp_path: Path) -> None:
    """alpha / r or alpha / sqrt(r) (rsLoRA), with rank and alpha patterns: PEFT's own ``scaling``."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in MODS:
        r = ranks.get(m, 4)
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, H, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(H, r, generator=g)
    (tmp_path / "a").mkdir()
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    cfg = tiny_config(4, 8.0, rslora) | {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "a"), "--json", "-"])
    assert result.exit_code == 0, result.output
    model = PeftModel.from_pretrained(tiny_llama(H), str(tmp_path / "a"))
    scaling = {
        n.removeprefix("base_model.model."): x.scaling["default"]
        for n, x in model.named_modules()
        if isinstance(x, LoraLayer)
    }
    modules = json.loads(result.stdout)["adapters"][0]["modules"]
    assert {m["name"] for m in modules} == set(MODS)
    for m in modules:
        assert m["rank"] == ranks.get(m["name"], 4)
        assert m["scale"] == pytest.approx(scaling[m["name"]], rel=1e-12)
