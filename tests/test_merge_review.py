"""What ``clair merge`` writes, loaded by PEFT, against formulas written here from the docs.

Independent of clair's arithmetic: every input adapter and every merged output is loaded with
``PeftModel.from_pretrained`` on a tiny base model, each module's update is PEFT's own
``scaling * B @ A`` (in the base weight's orientation, checked against ``merge_and_unload``),
and the expected merge is computed here in numpy from the docs (docs/usage/merge.md,
docs/engine.md): the coordinate-wise baselines, Krum, the projected merge, the norm bound,
centred clipping, ``--rescale norm``, ``--merge-rank`` and a coordinated group's one vote. A
truncated output may differ from its formula by the relative error its report states, and is a
best rank-r approximation of the formula (Eckart-Young), nothing more.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_llama
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from typer.testing import CliRunner

from clair_cli.cli import app

HIDDEN = 16
MODS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
SAMPLES = Path(__file__).resolve().parent.parent / "sample_adapters"


def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(SAMPLES / "base_model")).eval()


def tiny_config(r: int, alpha: float, rslora: bool) -> dict:
    """The PEFT config of the tiny Llama's q_proj / v_proj adapters of these tests."""
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": "tiny-llama",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj"],
        "fan_in_fan_out": False,
        "use_rslora": rslora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "lora_dropout": 0.0,
    }


def _write(directory: Path, tensors: dict[str, torch.Tensor], r: int, alpha: float, rslora: bool) -> None:
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(tiny_config(r, alpha, rslora)))


def write_pool(  # noqa: PLR0913 - the pool's recipe
    root: Path,
    K: int,
    seed: int,
    bad: tuple[int, ...] = (),
    big: int | None = None,
    boost: tuple[int, int, float] | None = None,
    mixed: bool = False,
    copies: int = 0,
) -> list[str]:
    """Benign adapters share a rank-2 column space per module (``bad`` do not); ``big`` is 2.2x
    larger, ``boost`` = (adapter, module, factor) one module larger; ``mixed``: ranks 2-4, alphas
    4-8 and one rslora adapter; ``copies``: near-copies (10 % noise) of adapter 0 appended."""
    g = torch.Generator().manual_seed(seed)
    shared = {m: torch.linalg.qr(torch.randn(HIDDEN, 2, generator=g))[0] for m in MODS}
    saved = []
    for i in range(K):
        r, alpha = ((2, 4, 3)[i % 3], (4, 8, 6)[i % 3]) if mixed else (4, 8)
        t = {}
        for j, m in enumerate(MODS):
            b = torch.randn(HIDDEN, r, generator=g) if i in bad else shared[m] @ torch.randn(2, r, generator=g)
            b = (b + 0.05 * torch.randn(HIDDEN, r, generator=g)) * (2.2 if i == big else 1.0)
            if boost is not None and boost[:2] == (i, j):
                b = b * boost[2]
            t[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, HIDDEN, generator=g) / 4
            t[f"base_model.model.{m}.lora_B.weight"] = b
        saved.append((t, r, alpha, mixed and i == 1))
    for _ in range(copies):
        t0, r, alpha, rs = saved[0]
        saved.append(({k: v * (1 + 0.1 * torch.randn(v.shape, generator=g)) for k, v in t0.items()}, r, alpha, rs))
    names = []
    for i, (t, r, alpha, rs) in enumerate(saved):
        _write(root / f"client_{i:02d}", t, r, alpha, rs)
        names.append(f"client_{i:02d}")
    return names


def peft_deltas(directory: Path, builder=tiny_llama) -> dict[str, np.ndarray]:
    """Each adapted module's update as PEFT loads ``directory``, ``d_out x d_in`` (Conv1D transposed)."""
    base = {n: p.detach().double().clone() for n, p in builder().named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(builder(), str(directory))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    out, fan = {}, {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.scaling:
            A = layer.lora_A["default"].weight.detach().double()
            B = layer.lora_B["default"].weight.detach().double()
            key = name.removeprefix("base_model.model.")
            out[key], fan[key] = (layer.scaling["default"] * (B @ A)).numpy(), layer.fan_in_fan_out
    for n, p in model.merge_and_unload().named_parameters():  # the orientation, by PEFT's own merge
        key = n.removesuffix(".weight")
        if key in out:
            diff = (p.detach().double() - base[n]).numpy()
            diff = diff.T if fan[key] else diff
            assert np.linalg.norm(diff - out[key]) <= 1e-3 * np.linalg.norm(out[key]) + 1e-6, key
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def merge(pool: Path, out: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        app, ["merge", str(pool), "--out", str(out), "--json", f"{out}.json", "--exit-zero", "-q", *args]
    )
    assert result.exit_code == 0, result.output
    return json.loads(Path(f"{out}.json").read_text())


def module_key(report_keys, name: str) -> str:
    """The report's key of a module PEFT names (GPT-2's ``transformer.h...`` in both)."""
    return next(k for k in report_keys if name.endswith(k) or k.endswith(name))


def assert_truncation_of(got: np.ndarray, want: np.ndarray, rank: int, reported: float) -> None:
    """``got`` is a best rank-``rank`` approximation of ``want`` and its error is ``reported``."""
    U, s, Vt = np.linalg.svd(want, full_matrices=False)
    best = (U[:, :rank] * s[:rank]) @ Vt[:rank]
    optimum = rel(best, want)
    err = rel(got, want)
    assert np.linalg.matrix_rank(got, tol=1e-9 * s[0]) <= rank
    assert err <= optimum * (1 + 1e-5) + 1e-6, (err, optimum)
    assert abs(err - reported) <= 1e-5 + 1e-4 * err, (err, reported)
    if rank < len(s) and (s[rank - 1] - s[rank]) > 1e-2 * s[0]:  # a well-separated rank: that one approximation
        assert rel(got, best) < 1e-2 if rank + 10 < min(want.shape) else rel(got, best) < 1e-5


# ---- the formulas --------------------------------------------------------------------------


def ties(X: np.ndarray, w: np.ndarray, density: float = 0.2) -> np.ndarray:
    """Top ``density`` magnitudes of each update, the sign of their sum elected, the weighted mean
    of the entries that agree with it."""
    T = np.zeros_like(X)
    for k in range(len(X)):
        flat = np.abs(X[k]).ravel()
        keep = np.argsort(-flat, kind="stable")[: int(density * flat.size)]
        mask = np.zeros(flat.size, bool)
        mask[keep] = True
        T[k] = np.where(mask.reshape(X[k].shape), X[k], 0.0)
    elected = np.where(T.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(T) == elected) * w[:, None, None]
    den = agree.sum(0)
    return np.where(den > 0, (T * agree).sum(0) / np.where(den > 0, den, 1.0), 0.0)


def krum(X: np.ndarray, m: int) -> list[int]:
    """Multi-Krum by loops: the ``m`` updates of least summed squared distance to their K - f - 2
    nearest others, f = (K - 3) // 2."""
    K = len(X)
    n = K - (K - 3) // 2 - 2
    V = X.reshape(K, -1)
    scores = [sum(sorted(float(((V[i] - V[j]) ** 2).sum()) for j in range(K) if j != i)[:n]) for i in range(K)]
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


def norm_factors(norms: np.ndarray, factor: float) -> np.ndarray:
    """min(1, tau / n): tau = median * min(max(factor, exp(3 sigma)), 2 factor), sigma = 1.4826 MAD of log norms."""
    logs = np.log(norms)
    centre = np.median(logs)
    sigma = 1.4826 * np.median(np.abs(logs - centre))
    tau = np.exp(centre) * min(max(factor, np.exp(3 * sigma)), 2 * factor)
    return np.minimum(1.0, tau / norms)


def geometric_median(V: np.ndarray) -> np.ndarray:
    y = V.mean(0)
    for _ in range(20000):
        d = np.linalg.norm(V - y, axis=1)
        y_new = (V / d[:, None]).sum(0) / (1 / d).sum()
        if np.linalg.norm(y_new - y) < 1e-15 * np.linalg.norm(y):
            break
        y = y_new
    return y_new


def centred_clipping(V: np.ndarray, w: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Karimireddy et al.: v <- v + sum_k w_k clip_tau(x_k - v) from the geometric median to its fixed
    point, tau = factor x the median distance from it (with an even count the lower of the two
    middle ones, torch.median's: docs/usage/merge.md). Returns the weights realising v, the factors."""
    v = geometric_median(V)
    dist = np.sort(np.linalg.norm(V - v, axis=1))
    tau = factor * dist[(len(dist) - 1) // 2]
    for _ in range(20000):
        d = np.linalg.norm(V - v, axis=1)
        c = np.minimum(1.0, tau / d)
        v_new = v + (w * c) @ (V - v)
        if np.linalg.norm(v_new - v) < 1e-15 * np.linalg.norm(v):
            break
        v = v_new
    beta = np.linalg.lstsq(V.T, v_new, rcond=None)[0]
    return beta / beta.sum(), c


def clair_mean(  # noqa: PLR0913 - the clair merge's options
    X: dict[str, np.ndarray],
    used: list[int],
    weights=None,
    groups=(),
    bound: float | None = 1.5,
    clip: float | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The clair merge of ``used``: a coordinated group's members share one member's weight; every
    update above the norm bound over all modules counts as one at it; centred clipping; each
    module's own norm bound (an update above both counts at the stricter)."""
    w = np.ones(len(used)) if weights is None else np.array([weights[k] for k in used], float)
    for g in groups:
        inside = [used.index(k) for k in g if k in used]
        if len(inside) > 1:
            w[inside] /= len(inside)
    w = w / w.sum()
    norms = {m: np.array([np.linalg.norm(X[m][k]) for k in used]) for m in X}
    whole = np.sqrt(sum(n**2 for n in norms.values()))
    c = norm_factors(whole, bound) if bound is not None else np.ones(len(used))
    w = w * c / (w * c).sum()
    info: dict[str, Any] = {"whole": c, "clip": None, "module": {}}
    if clip is not None:
        V = np.concatenate([np.stack([X[m][k].ravel() for k in used]) for m in X], axis=1)
        beta, info["clip"] = centred_clipping(V, w, clip)
        if (info["clip"] < 1).any():
            w = beta
    out = {}
    for m in X:
        wm = w
        if bound is not None:
            info["module"][m] = f = norm_factors(norms[m], bound)
            wm = w * np.minimum(1.0, f / c)
        out[m] = np.tensordot(wm / wm.sum(), X[m][used], 1)
    info["weights"] = w
    return out, info


# ---- pools ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("review") / "pool"
    names = write_pool(root, K=8, seed=1, mixed=True)
    deltas = [peft_deltas(root / n) for n in names]
    return root, names, {m: np.stack([d[m] for d in deltas]) for m in MODS}


@pytest.fixture(scope="module")
def clair_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, np.ndarray]]:
    """Eleven adapters of one recipe: one off the shared subspace (flagged), one 2.2x larger, one
    3x larger on one module; ten collaborators (an even count)."""
    root = tmp_path_factory.mktemp("review") / "clair"
    names = write_pool(root, K=11, seed=3, bad=(3,), big=5, boost=(7, 1, 3.0))
    deltas = [peft_deltas(root / n) for n in names]
    return root, names, {m: np.stack([d[m] for d in deltas]) for m in MODS}


# ---- the baselines -------------------------------------------------------------------------

W = [1, 2, 3, 1, 5, 1, 2, 4]
BASELINES = {
    "median": ([], lambda X: np.median(X, axis=0)),
    "median-rank-2": (["--merge-rank", "2"], lambda X: np.median(X, axis=0)),
    "trimmed-mean": ([], lambda X: np.sort(X, axis=0)[1:-1].mean(0)),  # floor(0.2 * 8) = 1 a side
    "ties": (["--weights", ",".join(map(str, W))], lambda X: ties(X, np.array(W, float))),
    "ties-rank-3": (["--merge-rank", "3"], lambda X: ties(X, np.ones(len(X)))),
}


@pytest.mark.parametrize("case", list(BASELINES))
def test_a_dense_baseline_loads_as_its_formula_truncated(case: str, baseline_pool, tmp_path: Path) -> None:
    root, _, X = baseline_pool
    args, formula = BASELINES[case]
    method = case.split("-rank")[0]
    report = merge(root, tmp_path / "m", "--method", method, "--base-model", "tiny-llama", *args)["merge"]
    got = peft_deltas(tmp_path / "m")
    assert set(got) == set(MODS)
    for m in MODS:
        want = formula(X[m])
        assert rel(want, X[m].mean(0)) > 0.05  # not the mean: the check can tell the methods apart
        assert report["relative_error"][m] > 1e-3  # a real truncation, measured
        assert_truncation_of(got[m], want, report["rank"][m], report["relative_error"][m])


@pytest.mark.parametrize("method", ["krum", "multi-krum"])
def test_krum_merges_the_adapters_a_loop_krum_selects(method: str, baseline_pool, tmp_path: Path) -> None:
    root, names, X = baseline_pool
    m_sel = 1 if method == "krum" else len(names) - (len(names) - 3) // 2
    report = merge(root, tmp_path / "m", "--method", method, "--base-model", "tiny-llama")["merge"]
    got = peft_deltas(tmp_path / "m")
    for m in MODS:
        chosen = krum(X[m], m_sel)
        assert report["selected"][m] == [names[k] for k in chosen]
        assert rel(got[m], X[m][chosen].mean(0)) < 1e-5


def test_a_fan_in_fan_out_pool_merges_in_the_right_orientation(tmp_path: Path) -> None:
    """GPT-2's Conv1D: TIES (weighted) and the projected clair merge, whose side depends on it."""
    names = ["client_01", "client_02", "client_03", "client_05", "client_06", "client_08", "client_13"]
    for n in names:
        shutil.copytree(SAMPLES / n, tmp_path / "pool" / n)
    deltas = [peft_deltas(tmp_path / "pool" / n, tiny_gpt2) for n in names]
    mods = sorted(deltas[0])
    X = {m: np.stack([d[m] for d in deltas]) for m in mods}
    w = np.array([3, 1, 2, 1, 1, 5, 2], float)
    report = merge(tmp_path / "pool", tmp_path / "ties", "--method", "ties", "--weights", ",".join(f"{x:g}" for x in w))
    got = peft_deltas(tmp_path / "ties", tiny_gpt2)
    for m in mods:
        k = module_key(report["merge"]["rank"], m)
        assert_truncation_of(got[m], ties(X[m], w), report["merge"]["rank"][k], report["merge"]["relative_error"][k])
    report = merge(tmp_path / "pool", tmp_path / "proj", "--project-rank", "2", "--norm-bound", "off")
    used = [i for i, a in enumerate(report["adapters"]) if not a["flagged"]]
    assert 4 <= len(used) < len(names)
    got = peft_deltas(tmp_path / "proj", tiny_gpt2)
    for m in mods:
        U = np.linalg.svd(np.concatenate([X[m][k] / np.linalg.norm(X[m][k]) for k in used], axis=1))[0][:, :2]
        mean = X[m][used].mean(0)
        assert rel(got[m], U @ (U.T @ mean)) < 1e-5 and rel(got[m], mean) > 0.05


def test_bare_gpt2_files_merged_with_lora_alpha_write_fan_in_fan_out(tmp_path: Path) -> None:
    """Bare GPT-2 files (Conv1D layers, weights stored in x out) read with --lora-alpha: the merged and refined
    configs said fan_in_fan_out false, which PEFT corrects at load with a warning ("fan_in_fan_out is set to
    False but the target module is `Conv1D`"). The base model's config.json (model_type gpt2) says true."""
    names = ["client_01", "client_02", "client_03", "client_05", "client_06", "client_08", "client_13"]
    (tmp_path / "bare").mkdir()
    for n in names:
        shutil.copy(SAMPLES / n / "adapter_model.safetensors", tmp_path / "bare" / f"{n}.safetensors")
    deltas = [peft_deltas(SAMPLES / n, tiny_gpt2) for n in names]  # with their own configs: r 4, lora_alpha 8
    bare = ["--lora-alpha", "8", "--base-model", str(SAMPLES / "base_model")]
    report = merge(tmp_path / "bare", tmp_path / "m", "--method", "mean", *bare)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = peft_deltas(tmp_path / "m", tiny_gpt2)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    for m in sorted(deltas[0]):
        k = module_key(report["merge"]["rank"], m)
        mean = np.mean([d[m] for d in deltas], axis=0)
        assert_truncation_of(got[m], mean, report["merge"]["rank"][k], report["merge"]["relative_error"][k])
    result = CliRunner().invoke(app, ["refine", str(tmp_path / "bare"), "--out", str(tmp_path / "r"), "-q", *bare])
    assert result.exit_code in (0, 1), result.output
    refined = sorted((tmp_path / "r").glob("*/adapter_config.json"))
    assert refined and all(json.loads(c.read_text())["fan_in_fan_out"] is True for c in refined)


# ---- the clair merge -----------------------------------------------------------------------


def _clair(clair_pool, out: Path, *args: str, weights=None, bound=1.5, clip=None, flagged=(3,)):
    root, names, X = clair_pool
    wargs = ["--weights", ",".join(map(str, weights))] if weights else []
    report = merge(root, out, "--base-model", "tiny-llama", *args, *wargs)
    used = [k for k, a in enumerate(report["adapters"]) if not a["flagged"]]
    assert used == [k for k in range(len(names)) if k not in flagged]
    groups = [[names.index(n) for n in g["members"]] for g in report["coordinated_groups"]]
    want, info = clair_mean(X, used, weights, groups, bound, clip)
    return report, used, want, info, peft_deltas(out)


def _assert_within_reported(report: dict, got: dict, want: dict) -> None:
    for m in MODS:
        err = report["merge"]["relative_error"][m]
        assert err <= report["merge"]["options"]["tol"] + 1e-9
        assert rel(got[m], want[m]) <= err + 1e-5, m


CW = [1, 2, 3, 1, 2, 1, 3, 2, 1, 2, 2]


def test_the_norm_bound_weights_updates_down_over_all_modules_and_on_each(clair_pool, tmp_path: Path) -> None:
    report, used, want, info, got = _clair(clair_pool, tmp_path / "m", "--norm-bound", "1.0", weights=CW, bound=1.0)
    _assert_within_reported(report, got, want)
    merged = report["merge"]
    mine = {str(k): round(float(c), 6) for k, c in zip(used, info["whole"], strict=True) if c < 1}
    assert mine and merged["norm_bounded"] == pytest.approx(mine, abs=2e-6)
    assert np.allclose(np.array(merged["weights"]), info["weights"], atol=2e-6)
    stricter = {
        m: {str(k): f for k, f, c in zip(used, info["module"][m], info["whole"], strict=True) if f < min(c, 1)}
        for m in MODS
    }
    stricter = {m: v for m, v in stricter.items() if v}
    assert stricter and merged["module_norm_bounded"].keys() == stricter.keys()
    for m, factors in stricter.items():
        assert merged["module_norm_bounded"][m] == pytest.approx(factors, abs=2e-6)
    off, *_, plain = _clair(clair_pool, tmp_path / "off", "--norm-bound", "off", weights=CW, bound=None)
    _assert_within_reported(off, plain, clair_mean(clair_pool[2], used, CW, (), None)[0])
    assert min(rel(want[m], plain[m]) for m in MODS) > 1e-3  # the bound changed every module


def test_centred_clipping_is_karimireddy_s_fixed_point(clair_pool, tmp_path: Path) -> None:
    report, used, want, info, got = _clair(
        clair_pool, tmp_path / "m", "--clip", "1.0", "--norm-bound", "off", "--merge-tol", "0", bound=None, clip=1.0
    )
    mine = {str(k): round(float(c), 6) for k, c in zip(used, info["clip"], strict=True) if c < 1}
    assert len(mine) >= 2 and report["merge"]["clipped"] == pytest.approx(mine, abs=2e-6)
    for m in MODS:
        assert rel(got[m], want[m]) < 1e-5


def test_rescale_norm_sets_the_lower_median_norm(clair_pool, tmp_path: Path) -> None:
    report, used, want, _, got = _clair(clair_pool, tmp_path / "m", "--rescale", "norm", "--merge-tol", "0")
    X = clair_pool[2]
    norms = np.sort(np.sqrt(sum(np.array([np.linalg.norm(X[m][k]) for k in used]) ** 2 for m in MODS)))
    scale = norms[(len(norms) - 1) // 2] / np.sqrt(sum(np.linalg.norm(want[m]) ** 2 for m in MODS))
    assert report["merge"]["scale"] == pytest.approx(scale, rel=1e-5) and scale > 1.5
    # The note the console prints is in the report's notes too.
    assert any(n.startswith("--rescale norm: merged update scaled by") for n in report["notes"]), report["notes"]
    for m in MODS:
        assert rel(got[m], scale * want[m]) < 1e-5


def test_merge_rank_is_the_best_approximation_at_the_stated_error(clair_pool, tmp_path: Path) -> None:
    report, _, want, _, got = _clair(clair_pool, tmp_path / "m", "--merge-rank", "3")
    for m in MODS:
        assert report["merge"]["rank"][m] == 3
        assert_truncation_of(got[m], want[m], 3, report["merge"]["relative_error"][m])


@pytest.mark.parametrize("side", ["out", "in"])
def test_the_projected_merge_is_u_ut_of_the_mean(side: str, clair_pool, tmp_path: Path) -> None:
    # adapter 3's B is off the shared column space, its A like everyone's: the input side sees nothing
    flagged = (3,) if side == "out" else ()
    report, used, want, _, got = _clair(
        clair_pool, tmp_path / "m", "--project-rank", "2", "--side", side, flagged=flagged
    )
    X = clair_pool[2]
    for m in MODS:
        units = [X[m][k] / np.linalg.norm(X[m][k]) for k in used]
        if side == "out":
            U = np.linalg.svd(np.concatenate(units, axis=1))[0][:, :2]
            expected = U @ (U.T @ want[m])
        else:
            V = np.linalg.svd(np.concatenate(units, axis=0))[2][:2].T
            expected = want[m] @ V @ V.T
        assert rel(got[m], expected) < 1e-5 and rel(got[m], want[m]) > 0.05


def test_the_cross_validated_projection_uses_the_rank_it_reports(clair_pool, tmp_path: Path) -> None:
    report, used, want, _, got = _clair(clair_pool, tmp_path / "m", "--project")
    X = clair_pool[2]
    for m in MODS:
        q = report["merge"]["projection_rank"][m]
        if q is None:
            expected = want[m]
        else:
            U = np.linalg.svd(np.concatenate([X[m][k] / np.linalg.norm(X[m][k]) for k in used], axis=1))[0][:, :q]
            expected = U @ (U.T @ want[m])
        assert rel(got[m], expected) <= report["merge"]["relative_error"][m] + 1e-5


def test_a_coordinated_group_counts_as_one_vote(tmp_path: Path) -> None:
    names = write_pool(tmp_path / "pool", K=9, seed=4, copies=2)
    deltas = [peft_deltas(tmp_path / "pool" / n) for n in names]
    X = {m: np.stack([d[m] for d in deltas]) for m in MODS}
    weights = [2, 1, 1, 3, 1, 2, 1, 1, 1, 4, 1]
    report = merge(
        tmp_path / "pool", tmp_path / "m", "--base-model", "tiny-llama", "--weights", ",".join(map(str, weights))
    )
    assert [g["members"] for g in report["coordinated_groups"]] == [["client_00", "client_09", "client_10"]]
    used = [k for k, a in enumerate(report["adapters"]) if not a["flagged"]]
    assert used == list(range(11))
    want, info = clair_mean(X, used, weights, [[0, 9, 10]])
    counted_apart, _ = clair_mean(X, used, weights, ())
    got = peft_deltas(tmp_path / "m")
    _assert_within_reported(report, got, want)
    assert min(rel(want[m], counted_apart[m]) for m in MODS) > 1e-2
    merged = np.array(report["merge"]["weights"])
    assert np.allclose(merged / merged.sum(), info["weights"], atol=2e-6)


# ---- what the card says ----------------------------------------------------------------------


def test_a_baseline_s_card_says_how_its_rank_was_chosen_and_lists_no_weights_for_order_statistics(
    baseline_pool, tmp_path: Path
) -> None:
    """The median's card said 'rank 4 (smallest within --merge-tol 0.001)' beside a measured error of
    0.2, and gave every adapter a weight of 1/K in a median and in Krum (which used one adapter)."""
    root = baseline_pool[0]
    for method, rank_how in {
        "median": "largest input rank",
        "krum": "selected adapter",
        "fedavg": "largest input rank",
    }.items():
        merge(root, tmp_path / method, "--method", method, "--base-model", "tiny-llama")
        card = (tmp_path / method / "README.md").read_text()
        rank_line = next(line for line in card.splitlines() if line.startswith("- rank of the written LoRA"))
        assert "--merge-tol" not in rank_line and rank_how in rank_line, rank_line
        assert "(not used by this method)" in card
        rows = [line for line in card.splitlines() if line.startswith("| `client_")]
        assert len(rows) == 8
        if method == "fedavg":
            assert all("| 0.125 |" in r for r in rows)
        else:
            assert not any("0.125" in r for r in rows) and "weights: none" in card
    merge(root, tmp_path / "mean", "--method", "mean", "--base-model", "tiny-llama")
    card = (tmp_path / "mean" / "README.md").read_text()
    assert "(smallest within --merge-tol 0.001)" in card and "not used" not in card


def test_a_bare_file_whose_base_model_is_unknown_has_a_note_on_fan_in_fan_out(tmp_path: Path) -> None:
    """Where nothing tells the base model's layer types, a bare file of GPT-2-named layers says so (GPT-BigCode
    names its nn.Linear layers so too: no guess from names alone)."""
    from clair_cli.io import SourceOptions, open_adapters
    from clair_cli.io.base_model import conv1d_base_model

    assert conv1d_base_model(str(SAMPLES / "base_model")) is True and conv1d_base_model("gpt2") is True
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert conv1d_base_model(str(tmp_path / "llama")) is False and conv1d_base_model(None) is None
    file = tmp_path / "client_01.safetensors"  # no config beside it
    shutil.copy(SAMPLES / "client_01" / "adapter_model.safetensors", file)
    (known,) = open_adapters([str(file)], SourceOptions(lora_alpha=8, base_model="openai-community/gpt2"))
    (unknown,) = open_adapters([str(file)], SourceOptions(lora_alpha=8, base_model=str(tmp_path / "nowhere")))
    assert known.config.fan_in_fan_out and not any("fan_in_fan_out" in n for n in known.notes)
    assert not unknown.config.fan_in_fan_out
    assert any("fan_in_fan_out taken as false" in n and "c_attn" in n for n in unknown.notes)
