"""Hostile inputs found by an eighth review from outside (2026-12-06), of the time an upload can
cost: factors whose products land in the subnormal range (about 100x slower on x86 CPUs), and a
pool whose updates share one subspace exactly, on which the noisy solver ran to its iteration cap
on every module. Each now costs what an ordinary pool of its size does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clair_cli.core.decompose import ModuleDecomposer, normalise_blocks
from clair_cli.core.reduction import reduce_module
from clair_cli.core.solvers import solve_noisy

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_adapters"

X86 = __import__("platform").machine().lower() in ("x86_64", "amd64", "i686", "x86")


@pytest.mark.skipif(not X86, reason="flush-to-zero is an x86 setting here")
def test_the_commands_flush_subnormals_before_torch_starts_its_threads():
    """A command reads subnormal products as zero, on its own thread and on every thread torch
    starts (each inherits the setting where it starts, so it must come first); the worker of
    --jobs takes the driver's setting with the others."""
    script = textwrap.dedent(
        f"""
        import os, sys, threading
        os.environ["CLAIR_NUM_THREADS"] = "2"
        import clair_cli.numerics

        require = clair_cli.numerics.require

        def first_use():  # where the command first needs tensors: what its work runs under
            ready = not clair_cli.numerics._pending
            require()
            if ready:
                return
            import torch
            from clair_cli.executors import denormals_flushed, numeric_settings
            x = torch.full((256, 256), 1e-20)
            seen = []
            worker = threading.Thread(target=lambda: seen.append(denormals_flushed()))
            worker.start()
            worker.join()
            print("flushed", denormals_flushed(), seen[0], float((x @ x).abs().max()), numeric_settings()[2],
                  file=sys.__stderr__)

        clair_cli.numerics.require = first_use
        sys.argv = ["clair", "inspect", {str(SAMPLE_DIR)!r}]
        from clair_cli.__main__ import run
        run()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "flushed True True 0.0 True" in done.stderr, done.stderr[-2000:]


def test_a_command_run_in_this_process_puts_the_setting_back():
    from typer.testing import CliRunner

    from clair_cli.cli import app
    from clair_cli.executors import denormals_flushed

    assert not denormals_flushed()
    result = CliRunner().invoke(app, ["inspect", str(SAMPLE_DIR)], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert not denormals_flushed()


def _module(n: int, rank: int, width: int, noise: float, outliers: int = 0, seed: int = 0):
    """``n`` adapters of one module whose ``B`` lie in one shared ``rank``-dimensional subspace
    (exactly where ``noise`` is 0); the last ``outliers`` have unstructured ``B``."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(width, rank, generator=g, dtype=torch.float64))[0]
    A, B = [], []
    for k in range(n):
        A.append(torch.randn(rank, width, generator=g, dtype=torch.float64) / width**0.5)
        if k >= n - outliers:
            B.append(torch.randn(width, rank, generator=g, dtype=torch.float64))
        else:
            b = U @ torch.randn(rank, rank, generator=g, dtype=torch.float64)
            B.append(
                b
                + noise * b.norm() / (width * rank) ** 0.5 * torch.randn(width, rank, generator=g, dtype=torch.float64)
            )
    return A, B, [1.0] * n


@pytest.mark.parametrize(("rank", "width"), [(8, 64), (1, 8)])
def test_updates_that_share_a_subspace_exactly_converge_at_once(rank, width):
    """Before, FISTA started from zero with weights of 1e-6 of the top singular value and ran to
    its cap of 1000 iterations on every such module (152 s for 16 adapters x 64 modules of rank 8,
    1024 wide, against 3 s for the same shapes with noise)."""
    A, B, scales = _module(16, rank, width, 0.0)
    dec = ModuleDecomposer().fit(reduce_module(A, B, scales, side="out"))
    assert dec.converged_ and dec.n_iter_ <= 50, dec.n_iter_
    assert dec.rank_ == rank and bool(dec.collaborators_.all())


@pytest.mark.parametrize(("noise", "outliers"), [(0.3, 0), (0.3, 3), (1.0, 3)])
def test_the_warm_start_finds_the_optimum_the_cold_start_finds(noise, outliers):
    A, B, scales = _module(12, 8, 64, noise, outliers, seed=1)
    stack = reduce_module(A, B, scales, side="out")
    dec = ModuleDecomposer().fit(stack)
    Y, _norms = normalise_blocks(stack.G.double(), stack.offsets)
    cold = solve_noisy(Y, stack.offsets, dec.lam_L_, dec.lam_S_, max_iter=100_000)
    assert dec.converged_ and cold.converged
    torch.testing.assert_close(dec.low_rank_, cold.L, atol=1e-5, rtol=0)
    torch.testing.assert_close(dec.sparse_, cold.S, atol=1e-5, rtol=0)


def _six_clients(tmp_path: Path) -> tuple[Path, Path]:
    """Six of the sample clients copied into a pool, and the last one's weights file."""
    import shutil

    pool = tmp_path / "pool"
    for client in sorted(SAMPLE_DIR.glob("client_0*"))[:6]:
        shutil.copytree(client, pool / client.name)
    return pool, pool / "client_06" / "adapter_model.safetensors"


def test_subnormal_factors_are_refused_not_read_as_zero(tmp_path: Path):
    """The commands flush subnormal numbers to zero, conversions included: a module whose A is
    subnormal (below 1.2e-38) and whose B is near 1e38 was audited as a zero update, while PEFT
    on a CPU (no flush) applies it. A payload of 10x an honest update's norm in one module of
    one client went from flagged (score 1.7, before the flush) to 'ok' (0.17) with it."""

    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from clair_cli.cli import app

    pool, weights = _six_clients(tmp_path)
    tensors = load_file(weights)
    key = "base_model.model.transformer.h.0.mlp.c_fc"
    A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
    g = torch.Generator().manual_seed(0)
    Ap, Bp = torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
    Ap /= Ap.abs().max()
    Bp *= 10 * (B @ A).norm() / (Bp @ Ap).norm()
    tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = Ap * 1.1e-38, Bp / 1.1e-38
    assert float((tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]).norm()) > 1  # no flush here
    save_file(tensors, weights, metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["audit", str(pool)], env={"NO_COLOR": "1"})
    assert result.exit_code == 2, result.output
    assert "subnormal" in result.output and "lora_A" in result.output


def test_has_subnormal_reads_the_bits():
    from clair_cli.executors import denormals_flushed
    from clair_cli.io.adapter import has_subnormal

    dtypes = (torch.float32, torch.bfloat16)
    tiny = [torch.tensor([0.0, 1.0, 1e-39], dtype=dtype) for dtype in dtypes]  # made before the flush
    normal = [torch.tensor([0.0, -1.0, 2e-38], dtype=dtype) for dtype in dtypes]
    normal.append(torch.tensor([1e-39, 1e-300], dtype=torch.float64))  # normal float64 values
    torch.set_flush_denormal(True)
    try:
        assert denormals_flushed() or not X86
        assert all(map(has_subnormal, tiny)) and not any(map(has_subnormal, normal))
        assert not has_subnormal(torch.tensor([1e-7, 0.0], dtype=torch.float16))  # normal in float32
    finally:
        torch.set_flush_denormal(False)


def test_a_stray_subnormal_beside_ordinary_factors_is_read_as_zero(tmp_path: Path):
    """The bit test runs only where subnormal values could hide more than 5e-20 in an entry of
    the update (the other factor near 1e18 or more): a subnormal entry in an ordinary adapter
    adds at most about 1e-36, so it is read as zero and the adapter audited, not refused."""

    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from clair_cli.cli import app
    from clair_cli.io.adapter import has_subnormal

    pool, weights = _six_clients(tmp_path)
    tensors = load_file(weights)
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"
    tensors[key][0, 0] = 1e-39
    assert has_subnormal(tensors[key])
    save_file(tensors, weights, metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["audit", str(pool), "--exit-zero"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "subnormal" not in result.output


def test_a_subnormal_lora_alpha_is_refused_by_its_bits():
    """A config's number under float64's normal range is refused whether or not the arithmetic
    flushes subnormals (the commands do; a comparison with 0 then says it is 0)."""
    from clair_cli.errors import AdapterFormatError
    from clair_cli.io.peft_config import _finite

    for flushed in (False, True):
        torch.set_flush_denormal(flushed)
        try:
            with pytest.raises(AdapterFormatError, match="under float64's normal range"):
                _finite("adapter_config.json", "lora_alpha", 1e-310)
            with pytest.raises(AdapterFormatError, match="is 0, which makes the update zero"):
                _finite("adapter_config.json", "lora_alpha", -0.0)
            assert _finite("adapter_config.json", "lora_alpha", 2.3e-308) == 2.3e-308
        finally:
            torch.set_flush_denormal(False)
