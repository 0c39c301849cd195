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
        import typer.core

        command = typer.core.TyperCommand.invoke

        def invoke(self, ctx):  # what the command itself runs under
            import torch
            from clair_cli.executors import denormals_flushed, numeric_settings
            x = torch.full((256, 256), 1e-20)
            seen = []
            worker = threading.Thread(target=lambda: seen.append(denormals_flushed()))
            worker.start()
            worker.join()
            print("flushed", denormals_flushed(), seen[0], float((x @ x).abs().max()), numeric_settings()[2],
                  file=sys.__stderr__)
            return command(self, ctx)

        typer.core.TyperCommand.invoke = invoke
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
