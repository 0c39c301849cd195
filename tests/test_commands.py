"""audit / merge / refine / gate end to end: PEFT loads the outputs and they equal the formulas."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import lora_config, run_cli, tiny_llama, write_adapter
from peft import PeftModel
from safetensors.torch import load_file
from scipy.stats import trim_mean
from typer.testing import CliRunner

from clair_cli.cli import app

HIDDEN = 16
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
K, BAD = 8, (2, 6)
SAMPLES = Path(__file__).parents[1] / "sample_adapters"


def pool_factors(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """K adapters; benign B's share a rank-2 column space per module, BAD ones do not."""
    g = torch.Generator().manual_seed(seed)
    U = {m: torch.linalg.qr(torch.randn(HIDDEN, 2, generator=g))[0] for m in MODULES}
    out = []
    for k in range(K):
        t = {}
        for m in MODULES:
            b = torch.randn(HIDDEN, 4, generator=g) if k in BAD else U[m] @ torch.randn(2, 4, generator=g)
            b = b + 0.02 * torch.randn(HIDDEN, 4, generator=g)
            t[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, HIDDEN, generator=g) / 4
            t[f"base_model.model.{m}.lora_B.weight"] = b
        out.append(t)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmdpool")
    for k, tensors in enumerate(pool_factors()):
        cfg = lora_config(lora_alpha=4 + 4 * (k % 3), task_type="CAUSAL_LM")
        write_adapter(root / f"client_{k:02d}", tensors, cfg)
    return root


def factors(pool: Path):
    """Per adapter: {module: (A, B, scale)} in float64."""
    out = []
    for k in range(K):
        cfg = json.loads((pool / f"client_{k:02d}" / "adapter_config.json").read_text())
        from safetensors.torch import load_file

        t = load_file(pool / f"client_{k:02d}" / "adapter_model.safetensors")
        s = cfg["lora_alpha"] / cfg["r"]
        out.append(
            {
                m: (
                    t[f"base_model.model.{m}.lora_A.weight"].double(),
                    t[f"base_model.model.{m}.lora_B.weight"].double(),
                    s,
                )
                for m in MODULES
            }
        )
    return out


def thetas(fs, m, ks=None):
    ks = range(K) if ks is None else ks
    return torch.stack([fs[k][m][2] * fs[k][m][1] @ fs[k][m][0] for k in ks])


def truncate(M: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(M)
    return (u[:, :r] * s[:r]) @ vh[:r]


def krum_select(T: torch.Tensor, m: int) -> list[int]:
    n = T.shape[0]
    f = (n - 3) // 2
    flat = T.flatten(1)
    scores = [
        sorted(float((flat[i] - flat[j]).square().sum()) for j in range(n) if j != i)[: n - f - 2] for i in range(n)
    ]
    return sorted(np.argsort([sum(s) for s in scores], kind="stable")[:m].tolist())


def projector(TC: torch.Tensor, q: int) -> torch.Tensor:
    """Dense reference: projection onto the q leading directions of the unit-norm updates."""
    U = torch.linalg.svd(torch.cat([t / t.norm() for t in TC], dim=1))[0][:, :q]
    return U @ U.T


def expected_update(method: str, fs, m: str, report: dict | None) -> torch.Tensor:
    T = thetas(fs, m)
    if method in ("clair", "clair --project"):
        names = [n for n in report["collaborative_set"]]
        C = [int(n.split("_")[1]) for n in names]
        TC = T[C]
        # The norm bound (on by default): a collaborator's weight times the stricter of its factors over
        # all modules and on this module (the report gives each by pool index, in report order).
        index = {a["name"]: i for i, a in enumerate(report["adapters"])}
        whole, own = report["merge"]["norm_bounded"], report["merge"]["module_norm_bounded"].get(m, {})
        factor = [own.get(str(index[n]), whole.get(str(index[n]), 1.0)) for n in names]
        w = torch.tensor(factor, dtype=torch.float64)
        mean = (w[:, None, None] * TC).sum(0) / w.sum()
        q = report["merge"].get("projection_rank", {}).get(m)
        return mean if q is None else projector(TC, q) @ mean
    if method == "mean":
        return T.mean(0)
    if method == "fedavg":
        return torch.stack([fs[k][m][2] * fs[k][m][1] for k in range(K)]).mean(0) @ torch.stack(
            [fs[k][m][0] for k in range(K)]
        ).mean(0)
    if method == "median":
        return truncate(torch.from_numpy(np.median(T.numpy(), axis=0)), 4)
    if method == "trimmed-mean":
        return truncate(torch.from_numpy(trim_mean(T.numpy(), 0.2, axis=0)), 4)
    if method in ("krum", "multi-krum"):
        return T[krum_select(T, 1 if method == "krum" else K - (K - 3) // 2)].mean(0)
    if method == "ties":
        kept = []
        for t in T:
            mask = torch.zeros(t.numel(), dtype=torch.bool)
            mask[torch.topk(t.abs().flatten(), int(0.2 * t.numel())).indices] = True
            kept.append(t * mask.view_as(t))
        X = torch.stack(kept)
        sign = torch.where(X.sum(0) >= 0, 1.0, -1.0).double()
        agree = (X.sign() == sign).double()
        return truncate((X * agree).sum(0) / agree.sum(0).clamp_min(1e-300), 4)
    raise AssertionError(method)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120"})


def test_audit_flags_exactly_the_contaminated(pool: Path) -> None:
    result = invoke("audit", str(pool), "--json", "-", "--device", "cpu")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["flagged"] == [f"client_{k:02d}" for k in BAD]
    assert report["shared_rank"] == {m: 2 for m in MODULES}


def test_sample_adapters_flags_match_manifest() -> None:
    manifest = json.loads((SAMPLES / "MANIFEST.json").read_text())
    result = invoke("audit", str(SAMPLES), "--json", "-", "--exit-zero")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = sorted(n for n, a in manifest["adapters"].items() if a["contaminated"])
    assert sorted(report["flagged"]) == expected


METHODS = ["clair", "clair --project", "mean", "fedavg", "median", "trimmed-mean", "krum", "multi-krum", "ties"]
# The exact mean (clair's default and `mean`) is written at the smallest rank within --merge-tol 1e-3.
TOLERANCE = {"clair": 1e-3 + 1e-6, "mean": 1e-3 + 1e-6}


@pytest.mark.parametrize("method", METHODS)
def test_merge_loads_in_peft_and_equals_the_formula(pool: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "merged"
    name, *flags = method.split()
    args = ["merge", str(pool), "--out", str(out), "--method", name, *flags, "--device", "cpu", "--exit-zero"]
    if name == "clair":
        args += ["--json", str(tmp_path / "report.json")]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text()) if name == "clair" else None
    if report is not None:
        assert report["merge"]["options"]["project"] == bool(flags)
        assert report["merge"]["max_relative_error"] <= 1e-3
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "client_07" in card and name in card

    base = tiny_llama()
    reference = tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(out))
    bad = [
        str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()
    ]
    assert not bad, bad
    fs = factors(pool)
    for m in MODULES:
        layer = model.get_submodule(f"base_model.model.{m}")
        got = layer.get_delta_weight("default").double()
        want = expected_update(method, fs, m, report)
        rel = float((got - want).norm() / want.norm())
        assert rel < TOLERANCE.get(method, 1e-5), (m, rel)
        ref_layer = reference.get_submodule(m)
        with torch.no_grad():  # the forward pass is base + the adapter's own update
            ref_layer.weight += got.float()
    x = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, atol=1e-5, rtol=1e-4)


def test_merge_with_weights_and_fixed_rank(pool: Path, tmp_path: Path) -> None:
    w = [1, 2, 3, 4, 5, 6, 7, 8]
    out = tmp_path / "m"
    result = invoke("merge", str(pool), "--out", str(out), "--method", "mean", "--weights", ",".join(map(str, w)))
    assert result.exit_code == 0, result.output
    model = PeftModel.from_pretrained(tiny_llama(), str(out))
    fs = factors(pool)
    wt = torch.tensor(w, dtype=torch.float64) / sum(w)
    for m in MODULES:
        got = model.get_submodule(f"base_model.model.{m}").get_delta_weight("default").double()
        want = (wt[:, None, None] * thetas(fs, m)).sum(0)
        assert float((got - want).norm() / want.norm()) <= 1e-3 + 1e-6
    out3 = tmp_path / "m3"
    assert invoke("merge", str(pool), "--out", str(out3), "--method", "mean", "--merge-rank", "3").exit_code == 0
    cfg = json.loads((out3 / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3


def test_rank_sets_detection_only(pool: Path, tmp_path: Path) -> None:
    """--rank changes the audit's subspace, never the merged adapter; --merge-rank sets its rank."""
    runs = {}
    for tag, extra in {"auto": [], "rank3": ["--rank", "3"], "merge3": ["--merge-rank", "3"]}.items():
        out = tmp_path / tag
        result = invoke("merge", str(pool), "--out", str(out), "--json", str(tmp_path / f"{tag}.json"), *extra)
        assert result.exit_code == 1, result.output  # the two contaminated adapters are flagged
        runs[tag] = (json.loads((tmp_path / f"{tag}.json").read_text()), load_file(out / "adapter_model.safetensors"))
    auto, rank3, merge3 = runs["auto"], runs["rank3"], runs["merge3"]
    assert rank3[0]["shared_rank"] == {m: 3 for m in MODULES} != auto[0]["shared_rank"]
    assert rank3[0]["collaborative_set"] == auto[0]["collaborative_set"]
    assert rank3[0]["merge"]["rank"] == auto[0]["merge"]["rank"]
    assert all(torch.equal(rank3[1][key], auto[1][key]) for key in auto[1])
    assert set(merge3[0]["merge"]["rank"].values()) == {3}
    assert merge3[0]["shared_rank"] == auto[0]["shared_rank"]


def test_refine_writes_one_peft_adapter_per_collaborator(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "refined"
    result = invoke("refine", str(pool), "--out", str(out), "--json", str(tmp_path / "r.json"), "--device", "cpu")
    assert result.exit_code == 1, result.output  # two adapters flagged
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == report["collaborative_set"]
    fs = factors(pool)
    C = [int(n.split("_")[1]) for n in report["collaborative_set"]]
    ranks = report["refine"]["projection_rank"]
    assert set(ranks) == set(MODULES)
    for k in C[:2]:
        src_cfg = json.loads((pool / f"client_{k:02d}" / "adapter_config.json").read_text())
        assert json.loads((out / f"client_{k:02d}" / "adapter_config.json").read_text()) == src_cfg
        model = PeftModel.from_pretrained(tiny_llama(), str(out / f"client_{k:02d}"))
        for m in MODULES:
            TC = thetas(fs, m, C)
            theta = thetas(fs, m, [k])[0]
            got = model.get_submodule(f"base_model.model.{m}").get_delta_weight("default").double()
            want = theta if ranks[m] is None else projector(TC, ranks[m]) @ theta
            assert float((got - want).norm() / want.norm()) < 1e-5


def test_gate_judges_candidates_against_reference(pool: Path, tmp_path: Path) -> None:
    refs = [str(pool / f"client_{k:02d}") for k in (0, 1, 3, 4, 5)]
    args = ["gate", str(pool / "client_06"), str(pool / "client_07")]
    for r in refs:
        args += ["--reference", r]
    result = invoke(*args, "--json", "-")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["flagged"] == ["client_06"]
    roles = {a["name"]: a["role"] for a in report["adapters"]}
    assert roles["client_00"] == "reference" and roles["client_07"] == "candidate"
    clean = invoke("gate", str(pool / "client_07"), *sum((["-r", r] for r in refs), []), "--markdown", "-")
    assert clean.exit_code == 0, clean.output
    assert clean.stdout.startswith("### clair gate: passed")
    assert "only 5 references" in clean.stdout  # fewer than 8: the report says the thresholds are wide


def test_reports_are_written_and_consistent(pool: Path, tmp_path: Path) -> None:
    js, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    result = invoke("audit", str(pool), "--json", str(js), "--markdown", str(md), "--plot", str(png), "--exit-zero")
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    for key in (
        "schema",
        "tool",
        "version",
        "base_model",
        "params",
        "modules",
        "shared_rank",
        "adapters",
        "collaborative_set",
        "flagged",
        "timing_s",
    ):
        assert key in report
    assert report["schema"] == 1 and report["params"]["seed"] == 0
    for a in report["adapters"]:
        assert set(a) >= {"name", "source", "revision", "score", "flagged", "reasons", "norm", "per_module"}
        assert set(a["per_module"]) == set(MODULES)
        assert a["flagged"] == bool(a["reasons"])
    text = md.read_text()
    assert text.startswith("### clair audit: 2 flagged") and "| `client_02` |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "client_02" in result.stdout and "FLAGGED" in result.stdout


def test_json_is_deterministic_apart_from_timing(pool: Path) -> None:
    runs = []
    for _ in range(2):
        report = json.loads(invoke("audit", str(pool), "--json", "-", "--exit-zero").stdout)
        report.pop("timing_s")
        report.pop("generated_at")
        runs.append(report)
    assert runs[0] == runs[1]


def test_existing_output_is_refused_and_kept(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("merge", str(pool), "--out", str(out))
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces an empty directory or an adapter clair wrote, never other data.
    result = invoke("merge", str(pool), "--out", str(out), "--force", "--exit-zero")
    assert result.exit_code == 2 and "holds keep.txt, which clair does not write" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # into the empty directory, then over the merge clair wrote there
        result = invoke("merge", str(pool), "--out", str(out), "--force", "--exit-zero")
        assert result.exit_code == 0 and (out / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    (out / "README.md").write_text("# my own notes\n")
    result = invoke("merge", str(pool), "--out", str(out), "--force", "--exit-zero")
    assert result.exit_code == 2 and "holds a README.md that clair did not write" in result.output
    assert (out / "README.md").read_text() == "# my own notes\n"


def test_force_replaces_a_merge_a_file_browser_has_shown(pool: Path, tmp_path: Path) -> None:
    """Finder's and Explorer's own files (.DS_Store, ._*, Thumbs.db, desktop.ini) are not data:
    --force replaces the output that holds them; a file of the same kind of name inside a
    directory clair did not write, or a directory named like one, is still refused."""
    out = tmp_path / "merged"
    assert invoke("merge", str(pool), "--out", str(out), "--exit-zero").exit_code == 0
    for name in (".DS_Store", "._adapter_model.safetensors", "Thumbs.db", "desktop.ini"):
        (out / name).write_bytes(b"\0\0\0\1Bud1")
    result = invoke("merge", str(pool), "--out", str(out), "--force", "--exit-zero")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    (out / "Thumbs.db").mkdir()  # a directory is not a browser's file
    (out / "Thumbs.db" / "keep.txt").write_text("mine")
    result = invoke("merge", str(pool), "--out", str(out), "--force", "--exit-zero")
    assert result.exit_code == 2 and "Thumbs.db/keep.txt, which clair does not write" in result.output


def test_force_replaces_a_refined_directory_clair_wrote(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "refined"
    for _ in range(2):
        result = invoke("refine", str(pool), "--out", str(out), "--force", "--exit-zero")
        assert result.exit_code == 0, result.output
    (sub,) = [p for p in out.iterdir()][:1]
    (sub / "optimizer.pt").write_bytes(b"mine")
    result = invoke("refine", str(pool), "--out", str(out), "--force", "--exit-zero")
    assert result.exit_code == 2 and f"holds {sub.name}/optimizer.pt, which clair does not write" in result.output


def test_force_replaces_nested_refined_adapters_but_not_someone_elses(tmp_path: Path) -> None:
    """Adapters named by nested paths are refined into nested directories, which --force replaces;
    a tree of adapters without clair's cards is someone else's and is kept (found by review)."""
    import shutil

    nested = tmp_path / "nested"
    for k, tensors in enumerate(pool_factors()):
        write_adapter(nested / ("team_a" if k % 2 else "team_b") / f"client_{k:02d}", tensors, lora_config())
    out = tmp_path / "refined"
    for _ in range(2):
        result = invoke("refine", str(nested), "--out", str(out), "--force", "--exit-zero")
        assert result.exit_code == 0, result.output
    assert any(p.name == "README.md" for p in (out / "team_a").rglob("*"))
    theirs = tmp_path / "theirs"
    shutil.copytree(nested, theirs)  # adapters, with no card clair wrote
    result = invoke("merge", str(nested), "--out", str(theirs), "--force", "--exit-zero")
    assert result.exit_code == 2 and "without the model card clair writes beside them" in result.output
    assert sorted(p.relative_to(theirs) for p in theirs.rglob("*")) == sorted(
        p.relative_to(nested) for p in nested.rglob("*")
    )


def test_failed_run_leaves_nothing(pool: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad_pool"
    for k in range(4):
        write_adapter(bad / f"a{k}", seed=k)
    (bad / "a3" / "adapter_model.safetensors").write_bytes(b"\x00" * 5)  # truncated
    out = tmp_path / "out"
    result = invoke("merge", str(bad), "--out", str(out))
    assert result.exit_code == 2 and "a3" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_pool"]


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["audit", "{pool}", "--rank", "zero"], 2, "--rank zero"),
        (["audit", "{pool}", "--side", "left"], 2, "'left' is not one of"),
        (["audit", "{pool}", "--threshold", "1.5"], 2, "--threshold"),
        (["audit", "{pool}", "--device", "tpu"], 2, "'tpu' is not one of"),
        (["audit", "{pool}", "--dtype", "float16"], 2, "'float16' is not one of"),
        (["audit", "{pool}", "--json", "-", "--markdown", "-"], 2, "cannot both go to stdout"),
        (["audit", "{pool}", "--plot", "x.jpg"], 2, "ending in .png"),
        (["audit", "{pool}/client_00", "{pool}/client_01"], 2, "clair needs at least 5 adapters"),
        (["merge", "{pool}", "--out", "{tmp}/o", "--method", "avg"], 2, "'avg' is not one of"),
        (["merge", "{pool}", "--out", "{tmp}/o", "--method", "median", "--weights", "1,2"], 2, "--weights"),
        (["merge", "{pool}", "--out", "{tmp}/o", "--weights", "1,2"], 2, "--weights has 2 values"),
        (["merge", "{pool}", "--out", "{tmp}/o", "--weights", "a,b"], 2, "comma-separated numbers"),
        # Python's float() reads "1_0" as 10 and "\uff11" (a full-width one) as 1: typos, not weights.
        (["merge", "{pool}", "--out", "{tmp}/o", "--weights", "1_0,1"], 2, "--weights 1_0,1: expected comma-separated"),
        (["merge", "{pool}", "--out", "{tmp}/o", "--weights", "\uff11,1"], 2, "expected comma-separated numbers"),
        (["merge", "{pool}", "--out", "{tmp}/o", "--weights", "1,-2"], 2, "non-negative"),
        # A doubled comma would shift every later weight to the next adapter.
        (["merge", "{pool}", "--out", "{tmp}/o", "--weights", "1,,1,1,1,1"], 2, "--weights 1,,1,1,1,1: an empty value"),
        (["merge", "{pool}", "--out", "{tmp}/missing/o"], 2, "does not exist"),
        (["gate", "{pool}/client_00"], 2, "no --reference"),
        (["gate", "{pool}/client_00", "-r", "{pool}/client_01"], 2, "at least 5 reference"),
        (["audit", "{pool}"], 1, "FLAGGED"),
        (["audit", "{pool}", "--exit-zero"], 0, "FLAGGED"),
        (["audit", *(f"{{pool}}/client_0{k}" for k in (0, 1, 3, 4, 5)), "--json", "-"], 0, '"flagged": []'),
    ],
)
def test_exit_codes(pool: Path, tmp_path: Path, args, code, message) -> None:
    args = [a.format(pool=pool, tmp=tmp_path) for a in args]
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    if code == 2:
        assert "Traceback" not in result.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,code",
    [(["audit", "{pool}"], 1), (["audit", "{pool}", "--exit-zero"], 0), (["audit", "{pool}", "--rank", "x"], 2)],
)
def test_exit_codes_in_a_real_process(pool: Path, args, code) -> None:
    proc = run_cli(*[a.format(pool=pool) for a in args])
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr


def test_merge_in_a_real_process(pool: Path, tmp_path: Path) -> None:
    proc = run_cli("merge", str(pool), "--out", str(tmp_path / "m"), "--quiet")
    assert proc.returncode == 1 and (tmp_path / "m" / "adapter_model.safetensors").exists()
    assert proc.stderr == ""
    proc = run_cli("merge", str(pool), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2 and proc.stderr.startswith("Error: ") and "already exists" in proc.stderr


def test_intersect_reports_dropped_modules(pool: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(pool, root)
    from safetensors.torch import load_file, save_file

    path = root / "client_03" / "adapter_model.safetensors"
    t = load_file(path)
    t = {k: v for k, v in t.items() if "layers.1.self_attn.v_proj" not in k}
    save_file(t, path)
    result = invoke("audit", str(root), "--json", "-", "--exit-zero")
    assert result.exit_code == 2 and "--intersect" in result.output
    result = invoke("audit", str(root), "--json", "-", "--exit-zero", "--intersect")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dropped_modules"] == ["model.layers.1.self_attn.v_proj"]
    assert len(report["modules"]) == 3 and not math.isnan(report["adapters"][0]["score"])


SNAPSHOTS = Path(__file__).parent / "snapshots"


def _normalise(text: str) -> str:
    import re

    return re.sub(r"\(\d+\.\d s\)", "(T s)", text)


@pytest.mark.parametrize("mode,args", [("audit_table.txt", []), ("audit_markdown.md", ["--markdown", "-"])])
def test_sample_report_snapshots(mode: str, args: list[str]) -> None:
    import os
    from importlib.metadata import version

    from packaging.version import Version

    if mode == "audit_table.txt" and Version(version("rich")) < Version("14.3"):
        # Same rows and words; Rich before 14.3 gives the adapter column one more space of width.
        pytest.skip("the table snapshot is Rich >= 14.3's column layout")
    proc = run_cli("audit", str(SAMPLES), "--exit-zero", "--device", "cpu", *args, env={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    text = _normalise(proc.stdout).replace(str(SAMPLES), "sample_adapters")
    snap = SNAPSHOTS / mode
    if os.environ.get("CLAIR_UPDATE_SNAPSHOTS"):
        snap.write_text(text)
    assert text == snap.read_text()
    assert "\x1b[" not in text  # plain under NO_COLOR and a pipe


def test_refine_and_gate_exit_codes_in_a_real_process(pool: Path, tmp_path: Path) -> None:
    proc = run_cli("refine", str(pool), "--out", str(tmp_path / "r"), "-q")
    assert proc.returncode == 1 and len(list((tmp_path / "r").iterdir())) == K - len(BAD)
    refs = sum((["-r", str(pool / f"client_{k:02d}")] for k in (0, 1, 3, 4, 5)), [])
    assert run_cli("gate", str(pool / "client_06"), *refs, "-q").returncode == 1
    assert run_cli("gate", str(pool / "client_07"), *refs, "-q").returncode == 0
    proc = run_cli("gate", str(pool / "client_07"), "-r", str(pool / "client_07"))
    assert proc.returncode == 2 and "both a candidate and a reference" in proc.stderr


def test_gate_tells_a_namesake_from_the_reference_itself(pool: Path, tmp_path: Path) -> None:
    """A candidate named like a reference but another adapter is not the reference vouching for
    itself: the refusal names both files; the same directory given twice is still that."""
    upload = tmp_path / "uploads" / "client_01"
    shutil.copytree(pool / "client_07", upload)
    refs = [str(pool / f"client_{k:02d}") for k in (0, 1, 3, 4, 5)]
    result = invoke("gate", str(upload), *(a for r in refs for a in ("-r", r)))
    assert result.exit_code == 2
    assert "a candidate and a reference adapter are both named 'client_01'" in result.output
    assert "uploads/client_01" in result.output and "rename one" in result.output
    result = invoke("gate", str(pool / "client_01" / ".." / "client_01"), *(a for r in refs for a in ("-r", r)))
    assert result.exit_code == 2 and "both a candidate and a reference adapter" in result.output
