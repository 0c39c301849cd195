"""Performance suite: clair against the I/O floor, a dense decomposition and PEFT's merges.

    make bench                                   # = python -m benchmarks.perf (CPU, default pool)
    python -m benchmarks.perf --preset small     # a quick run (1024 wide, 4 layers)
    python -m benchmarks.perf --device cuda      # the same on a GPU

One run measures, side by side (medians of ``--runs`` runs, each a fresh process
whose peak resident memory is read with ``wait4``):

1. end to end on a generated pool (:mod:`benchmarks.poolgen`; default Llama-2-7B
   shapes, K = 64, bf16, 2.1 GB): the I/O floor (every tensor read with safetensors
   into float32), ``clair audit`` and ``clair merge``; the audit's verdicts are
   checked against the pool's contaminated adapters;
2. one module (K = 32, r = 16, 4096 x 4096): clair's audit against the same
   decomposition done densely (extrapolated from one timed dense SVD-equivalent times
   the SVDs the run needs), and clair's exact / rank-truncated mean against PEFT's
   ``add_weighted_adapter`` (``cat`` / ``svd``), with time, peak memory and the
   relative error against the exact weighted sum;
3. scaling of one module's audit in K, r and width (PNG plots), with the convex and
   the fast path timed side by side to locate their switch-over.

Results: a Markdown summary on stdout and ``--out`` (JSON and PNGs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import poolgen

ROOT = Path(__file__).resolve().parent.parent
CLAIR = [sys.executable, "-m", "clair_cli"]
# The merge's peak resident memory on the default (Llama-2-7B-shaped) pool must stay below this.
MERGE_PEAK_BOUND = 2**30


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; wall time, peak RSS (bytes) of that process, exit code and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return {"wall_s": wall, "rc": proc.returncode, "stdout": out.decode(), "stderr": err.decode()}


def timed(cmd: list[str], runs: int) -> dict:
    """Median wall time and the peak RSS of ``runs`` runs of ``cmd``, each measured by a ``_rusage`` parent."""
    walls, peaks = [], []
    for _ in range(runs):
        r = run_measured([sys.executable, "-m", "benchmarks.perf", "_rusage", "--", *cmd])
        info = json.loads(r["stdout"].strip().splitlines()[-1])
        walls.append(info["wall_s"])
        peaks.append(info["max_rss"])
    return {"wall_s": statistics.median(walls), "runs": walls, "max_rss": max(peaks)}


def _rusage(cmd: list[str]) -> None:
    """Run ``cmd`` as a child and print its wall time and its own peak RSS as JSON."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if code not in (0, 1):
        print(f"{' '.join(cmd)} failed ({code}):\n{err[-2000:]}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps({"wall_s": wall, "max_rss": usage.ru_maxrss * 1024, "rc": code}))


# ----------------------------------------------------------------------------- workers


def _io_floor(pool: Path) -> None:
    import torch
    from safetensors import safe_open

    n = 0
    start = time.perf_counter()
    for f in sorted(pool.glob("*/adapter_model.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                n += h.get_tensor(key).to(torch.float32).numel()
    print(json.dumps({"values": n, "read_s": time.perf_counter() - start}))


def _dense_floor(pool: Path, threads: int = 1) -> None:
    """The audit's unavoidable dense work: the exact Gram products ``A A^T`` and ``B^T B`` of every
    module's stacked factors (float32, the fast path's precision; one thread, the command
    line's default, or ``threads``: the floor of ``--jobs`` on that many cores), timed apart
    from reading them."""
    import torch
    from safetensors import safe_open

    from clair_cli.core.pairwise import factor_grams

    torch.set_num_threads(threads)
    files = sorted(pool.glob("*/adapter_model.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in handles[0].keys() if ".lora_A." in k})  # noqa: SIM118
    factor_grams(*[[torch.ones(2, 8)], [torch.ones(8, 2)]])  # warm-up
    total = 0.0
    for name in modules:
        A = [h.get_tensor(f"{name}.lora_A.weight").to(torch.float32) for h in handles]
        B = [h.get_tensor(f"{name}.lora_B.weight").to(torch.float32) for h in handles]
        start = time.perf_counter()
        factor_grams(A, B)
        total += time.perf_counter() - start
    print(json.dumps({"gram_s": total, "modules": len(modules), "adapters": len(files)}))


def _module(k: int, r: int, d: int, bad: int = 2):
    """One module of a generated pool: ``(A, B, scales)`` in float32."""
    spec = poolgen.PoolSpec(k=k, layers=1, hidden=d, rank=r, shared=min(8, r), bad=bad)
    U = poolgen.shared_bases(spec)[0]
    A, B = zip(*[poolgen.module_factors(spec, j, 0, U) for j in range(k)], strict=True)
    return list(A), list(B), [spec.alpha / spec.rank] * k


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _point(k: int, r: int, d: int, solver: str, device: str) -> None:
    """Time one module's audit (ClairAuditor.fit) for a scaling point."""
    import torch

    from clair_cli.core.audit import ClairAuditor, ModuleInput

    torch.ones(8) @ torch.ones(8)  # torch initialised: the baseline resident memory
    baseline = _peak()
    A, B, s = _module(k, r, d)
    A = [a.to(device) for a in A]
    B = [b.to(device) for b in B]
    mod = ModuleInput("m", list(range(k)), A, B, s)
    ClairAuditor(solver=solver, device=device).fit([mod], k)  # warm-up (allocator, kernels)
    start = time.perf_counter()
    aud = ClairAuditor(solver=solver, device=device).fit([mod], k)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    res = aud.module_results_[0]
    print(
        json.dumps(
            {
                "wall_s": wall,
                "rss_growth": max(_peak() - baseline, 0),  # the factors and the work on them
                "factors_bytes": sum(t.numel() * 4 for t in A + B),
                "path": res.solver,
                "rank": res.rank,
                "n_iter": res.n_iter,
                "flagged": [j for j, f in enumerate(aud.flagged_) if f],
            }
        )
    )


def _module_vs_dense(k: int, r: int, d: int) -> None:
    """clair's factored audit of one module, and the dense decomposition extrapolated."""
    import torch

    from clair_cli.core.audit import ClairAuditor, ModuleInput

    A, B, s = _module(k, r, d)
    mod = ModuleInput("m", list(range(k)), A, B, s)
    start = time.perf_counter()
    aud = ClairAuditor().fit([mod], k)
    clair_s = time.perf_counter() - start
    res = aud.module_results_[0]
    # SVDs of the full stack the same decomposition needs densely: the spectrum, the null
    # draws, one per solver iteration, and the subspace re-estimate.
    svds = 1 + res.null_draws + res.n_iter + 1
    before = _peak()
    start = time.perf_counter()
    Y = torch.cat([float(sk) * b @ a for a, b, sk in zip(A, B, s, strict=True)], dim=1)  # d x K d
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    torch.linalg.eigvalsh(Y @ Y.T)  # one SVD-equivalent of the stack (its Gram route, the cheapest)
    svd_s = time.perf_counter() - start
    dense_rss = _peak() - before
    print(
        json.dumps(
            {
                "clair_s": clair_s,
                "path": res.solver,
                "rank": res.rank,
                "n_iter": res.n_iter,
                "dense_build_s": build_s,
                "dense_svd_s": svd_s,
                "dense_svds": svds,
                "dense_s": build_s + svds * svd_s,
                "dense_rss_growth": dense_rss,
                "stack_bytes": Y.numel() * 4,
            }
        )
    )


def _decomposition_error(k: int = 8, r: int = 4, d: int = 256) -> dict:
    """Factored against dense decomposition on a module small enough to run densely (fixed rank)."""
    import torch

    from clair_cli.core.decompose import ModuleDecomposer
    from clair_cli.core.reduction import FactoredStack, reduce_module

    A, B, s = _module(k, r, d, bad=1)
    A = [a.double() for a in A]
    B = [b.double() for b in B]
    fact = ModuleDecomposer(rank=min(8, r)).fit(reduce_module(A, B, s))
    Y = torch.cat([sk * b @ a for a, b, sk in zip(A, B, s, strict=True)], dim=1)
    eye = torch.eye(d, dtype=torch.float64)
    dense_stack = FactoredStack(eye, Y, tuple(eye for _ in range(k)), tuple(range(0, k * d + 1, d)))
    dense = ModuleDecomposer(rank=min(8, r)).fit(dense_stack)
    return {
        "off_subspace_max_abs_diff": float((fact.off_subspace_ - dense.off_subspace_).abs().max()),
        "residual_max_abs_diff": float((fact.residual_ - dense.residual_).abs().max()),
        "subspace_projector_diff": float(
            (fact.subspace_ @ fact.subspace_.T - dense.subspace_ @ dense.subspace_.T).norm()
        ),
    }


def _merge_vs_peft(k: int, r: int, d: int, which: str) -> None:
    """One merge of one module: clair (exact / truncated mean) or PEFT (cat / svd)."""
    import torch

    A, B, s = _module(k, r, d)
    w = [1.0 / k] * k
    torch.cat([a @ a.T for a in A[:2]])  # warm up torch's kernels and thread pool before timing
    exact = sum(wk * sk * b.double() @ a.double() for wk, sk, a, b in zip(w, s, A, B, strict=True))
    before = _peak()
    if which.startswith("clair"):
        from clair_cli.core.baselines import mean

        start = time.perf_counter()
        res = mean(A, B, s, w, rank=r if which == "clair-svd" else None)
        wall = time.perf_counter() - start
        delta = res.B.double() @ res.A.double()
    else:
        from peft import LoraConfig, get_peft_model

        class Tiny(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.proj = torch.nn.Linear(d, d, bias=False)

        cfg = LoraConfig(r=r, lora_alpha=int(s[0] * r), target_modules=["proj"])
        model = get_peft_model(Tiny(), cfg, adapter_name="a0")
        for j in range(k):
            name = f"a{j}"
            if j:
                model.add_adapter(name, cfg)
            model.base_model.model.proj.lora_A[name].weight.data.copy_(A[j])
            model.base_model.model.proj.lora_B[name].weight.data.copy_(B[j])
        combo = which.removeprefix("peft-")
        extra = {"svd_rank": r} if combo == "svd" else {}
        before = _peak()
        start = time.perf_counter()
        model.add_weighted_adapter([f"a{j}" for j in range(k)], w, "merged", combination_type=combo, **extra)
        wall = time.perf_counter() - start
        delta = model.base_model.model.proj.get_delta_weight("merged").double()
    err = float((delta - exact).norm() / exact.norm())
    print(json.dumps({"wall_s": wall, "rss_growth": max(_peak() - before, 0), "rel_error": err}))


WORKERS = {"_io_floor", "_dense_floor", "_point", "_module_vs_dense", "_merge_vs_peft", "_rusage"}


def worker(argv: list[str]) -> None:
    name, args = argv[0], argv[1:]
    if name == "_rusage":
        _rusage(args[1:] if args and args[0] == "--" else args)
    elif name == "_io_floor":
        _io_floor(Path(args[0]))
    elif name == "_dense_floor":
        _dense_floor(Path(args[0]), int(args[1]) if len(args) > 1 else 1)
    elif name == "_point":
        _point(int(args[0]), int(args[1]), int(args[2]), args[3], args[4])
    elif name == "_module_vs_dense":
        _module_vs_dense(int(args[0]), int(args[1]), int(args[2]))
    elif name == "_merge_vs_peft":
        _merge_vs_peft(int(args[0]), int(args[1]), int(args[2]), args[3])


def call(*args: object) -> dict:
    r = run_measured([sys.executable, "-m", "benchmarks.perf", *map(str, args)])
    return json.loads(r["stdout"].strip().splitlines()[-1])


# ----------------------------------------------------------------------------- suite


def end_to_end(pool: Path, spec: poolgen.PoolSpec, runs: int, device: str, work: Path) -> dict:
    floor = timed([sys.executable, "-m", "benchmarks.perf", "_io_floor", str(pool)], runs)
    floor_in = call("_io_floor", pool)["read_s"]
    dense = statistics.median(call("_dense_floor", pool)["gram_s"] for _ in range(runs))
    startup = timed([sys.executable, "-c", "import torch, safetensors"], runs)
    report = work / "audit.json"
    audit = timed([*CLAIR, "audit", str(pool), "--json", str(report), "-q", "--exit-zero", "--device", device], runs)
    verdict = json.loads(report.read_text())
    flagged = sorted(a["name"] for a in verdict["adapters"] if a["flagged"])
    expected = sorted(spec.name(j) for j in spec.contaminated)
    merge = timed(
        [*CLAIR, "merge", str(pool), "--out", str(work / "merged"), "--force", "-q", "--device", device], runs
    )
    return {
        "pool_bytes": spec.bytes_on_disk(),
        "io_floor": floor,
        "io_floor_in_process_s": floor_in,
        "dense_floor_s": dense,
        "python_torch_startup": startup,
        "audit": audit,
        "merge": merge,
        "audit_timing_s": verdict.get("timing_s"),
        "flagged": flagged,
        "verdicts_correct": flagged == expected,
    }


def per_module(k: int, r: int, d: int) -> dict:
    out = {"k": k, "r": r, "d": d, "audit": call("_module_vs_dense", k, r, d)}
    out["decomposition_error_small"] = _decomposition_error()
    for which in ("clair-exact", "clair-svd", "peft-cat", "peft-svd"):
        out[which] = call("_merge_vs_peft", k, r, d, which)
    return out


def scaling(device: str, quick: bool) -> dict:
    axes = {
        "K": [(k, 16, 4096) for k in ((8, 16, 32, 64) if quick else (8, 16, 32, 48, 64, 128, 256))],
        "r": [(32, r, 4096) for r in ((4, 16) if quick else (4, 8, 16, 32, 64))],
        "width": [(32, 16, d) for d in ((1024, 4096) if quick else (1024, 2048, 4096, 8192))],
    }
    out: dict[str, list] = {}
    for axis, points in axes.items():
        rows = []
        for k, r, d in points:
            row = {"k": k, "r": r, "d": d, "auto": call("_point", k, r, d, "auto", device)}
            if axis == "K" and k * r <= 1024:  # both paths where the switch-over can lie
                row["convex"] = call("_point", k, r, d, "convex", device)
                row["fast"] = call("_point", k, r, d, "fast", device)
            rows.append(row)
            print(f"  scaling {axis}: K={k} r={r} d={d}: {row['auto']['wall_s']:.3f} s", file=sys.stderr)
        out[axis] = rows
    return out


def plot(scale: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    for axis, key in (("K", "k"), ("r", "r"), ("width", "d")):
        rows = scale[axis]
        x = [row[key] for row in rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        ax1.loglog(x, [row["auto"]["wall_s"] for row in rows], "o-", label="clair (auto)")
        if any("convex" in row for row in rows):
            xs = [row[key] for row in rows if "convex" in row]
            ax1.loglog(xs, [row["convex"]["wall_s"] for row in rows if "convex" in row], "s--", label="convex")
            ax1.loglog(xs, [row["fast"]["wall_s"] for row in rows if "fast" in row], "^--", label="fast")
        ax1.set_xlabel(axis)
        ax1.set_ylabel("seconds per module")
        ax1.legend()
        # ru_maxrss is a high-water mark: points whose work fits under torch's start-up peak show no growth.
        grown = [(row[key], row["auto"]["rss_growth"] / 2**20) for row in rows if row["auto"]["rss_growth"] > 0]
        if grown:
            ax2.loglog(*zip(*grown, strict=True), "o-", label="peak RSS over torch's baseline")
        ax2.loglog(x, [row["auto"]["factors_bytes"] / 2**20 for row in rows], "k:", label="the module's factors")
        ax2.set_xlabel(axis)
        ax2.set_ylabel("MiB")
        ax2.legend()
        for ax in (ax1, ax2):
            ax.set_xticks(x, labels=[str(v) for v in x])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        fig.suptitle(f"one module's audit against {axis}")
        fig.tight_layout()
        path = out / f"scaling_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
    return files


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def summary(res: dict) -> str:
    e = res["end_to_end"]
    io = e["io_floor"]["wall_s"]
    dense = e.get("dense_floor_s", 0.0)
    floor = max(io, dense)  # the audit's floor: the larger of reading and its exact Gram products
    lines = [
        f"## clair performance ({res['machine']})",
        "",
        f"Pool: {res['pool']['k']} adapters, {res['pool']['layers']} layers x 4 projections, "
        f"{res['pool']['hidden']} wide, r = {res['pool']['rank']}, {res['pool']['dtype']}, "
        f"{e['pool_bytes'] / 1e9:.2f} GB; medians of {res['runs']} runs; verdicts correct: {e['verdicts_correct']}.",
        "",
        "| step | wall (s) | x floor | peak RSS |",
        "|---|---:|---:|---:|",
        f"| I/O floor (process: start, import torch, read all tensors to float32) | {io:.2f} | {io / floor:.2f} | "
        f"{gib(e['io_floor']['max_rss'])} |",
        f"| dense floor (the exact Gram products A A^T and B^T B of every module, float32, one thread) | "
        f"{dense:.2f} | {dense / floor:.2f} | |",
        f"| of which reading (in process) | {e['io_floor_in_process_s']:.2f} | | |",
        f"| of which Python + torch start-up | {e['python_torch_startup']['wall_s']:.2f} | | |",
        f"| `clair audit` | {e['audit']['wall_s']:.2f} | {e['audit']['wall_s'] / floor:.2f} | "
        f"{gib(e['audit']['max_rss'])} |",
        f"| `clair merge` | {e['merge']['wall_s']:.2f} | {e['merge']['wall_s'] / floor:.2f} | "
        f"{gib(e['merge']['max_rss'])} |",
        "",
        f"Merge peak under {gib(MERGE_PEAK_BOUND)} (the merged modules are streamed into the output file): "
        f"{'met' if e['merge']['max_rss'] < MERGE_PEAK_BOUND else 'NOT MET'}.",
    ]
    m = res["per_module"]
    a = m["audit"]
    lines += [
        "",
        f"### One module: K = {m['k']}, r = {m['r']}, {m['d']} x {m['d']}",
        "",
        "| task | clair (s) | other (s) | speed-up | rel. error vs exact | peak RSS growth (clair / other) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| decomposition ({a['path']} path, rank {a['rank']}) vs dense: {a['dense_svds']} stack SVDs x "
        f"{a['dense_svd_s']:.1f} s + {a['dense_build_s']:.1f} s to build (extrapolated) | {a['clair_s']:.3f} | "
        f"{a['dense_s']:.0f} | {a['dense_s'] / a['clair_s']:.0f}x | see below | - / {gib(a['dense_rss_growth'])} |",
    ]
    for ours, theirs, label in (("clair-svd", "peft-svd", "rank-r merge"), ("clair-exact", "peft-cat", "exact merge")):
        c, p = m[ours], m[theirs]
        lines.append(
            f"| {label}: clair mean vs PEFT `{theirs.removeprefix('peft-')}` | {c['wall_s']:.3f} | {p['wall_s']:.3f} | "
            f"{p['wall_s'] / max(c['wall_s'], 1e-9):.0f}x | {c['rel_error']:.2e} / {p['rel_error']:.2e} | "
            f"{gib(c['rss_growth'])} / {gib(p['rss_growth'])} |"
        )
    err = m["decomposition_error_small"]
    lines += [
        "",
        f"Factored vs dense decomposition on a module small enough to run densely (K = 8, 256 wide): "
        f"off-subspace shares differ by at most {err['off_subspace_max_abs_diff']:.1e}, residual shares by "
        f"{err['residual_max_abs_diff']:.1e}, subspace projectors by {err['subspace_projector_diff']:.1e}.",
        "",
        "### Scaling of one module's audit (seconds; auto path; convex / fast where both were timed)",
        "",
        "| K | r | width | auto (s) | path | convex (s) | fast (s) | peak RSS over torch's baseline | factors |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for axis in ("K", "r", "width"):
        for row in res["scaling"][axis]:
            conv = f"{row['convex']['wall_s']:.3f}" if "convex" in row else ""
            fast = f"{row['fast']['wall_s']:.3f}" if "fast" in row else ""
            lines.append(
                f"| {row['k']} | {row['r']} | {row['d']} | {row['auto']['wall_s']:.3f} | {row['auto']['path']} | "
                f"{conv} | {fast} | {gib(row['auto']['rss_growth'])} | {gib(row['auto']['factors_bytes'])} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--replot"]:  # redraw the PNGs from the last perf.json
        out = ROOT / "benchmarks" / "results"
        plot(json.loads((out / "perf.json").read_text())["scaling"], out)
        return
    if argv and argv[0] in WORKERS:
        worker(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    poolgen.add_spec_arguments(parser)
    parser.add_argument("--runs", type=int, default=3, help="runs per end-to-end measurement (median)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--pool-dir", type=Path, default=Path(tempfile.gettempdir()) / "clair-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="fewer scaling points, no per-module comparison")
    args = parser.parse_args(argv)
    spec = poolgen.spec_from_args(args)
    pool = poolgen.ensure(spec, args.pool_dir / f"{args.preset}-k{spec.k}-r{spec.rank}-{spec.dtype}")
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.device}",
        "pool": spec.__dict__,
        "runs": args.runs,
    }
    with tempfile.TemporaryDirectory() as work:
        print("end to end ...", file=sys.stderr)
        res["end_to_end"] = end_to_end(pool, spec, args.runs, args.device, Path(work))
    if not args.quick:
        print("one module against dense and PEFT ...", file=sys.stderr)
        res["per_module"] = per_module(32, 16, 4096)
    print("scaling ...", file=sys.stderr)
    res["scaling"] = scaling(args.device, args.quick)
    res["plots"] = plot(res["scaling"], args.out)  # python -m benchmarks.perf --replot redraws them
    (args.out / "perf.json").write_text(json.dumps(res, indent=2))
    if "per_module" in res:
        text = summary(res)
        (args.out / "perf.md").write_text(text + "\n")
        print(text)
    else:
        print(json.dumps(res["end_to_end"], indent=2))


if __name__ == "__main__":
    main()
