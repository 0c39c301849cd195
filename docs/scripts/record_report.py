"""Record `clair audit sample_adapters` as the terminal shows it, into docs/assets/audit.svg.

Run from the repository root:  python docs/scripts/record_report.py
The command runs in a subprocess with colour forced at a fixed width; its ANSI output is
replayed into a recording Rich console and saved as SVG, so the picture is the real output.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

WIDTH = 100
ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(FORCE_COLOR="1", COLUMNS=str(WIDTH), TERM="xterm-256color")
    done = subprocess.run(
        [sys.executable, "-m", "clair_cli", "audit", "sample_adapters", "--exit-zero"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    console = Console(file=io.StringIO(), record=True, width=WIDTH, force_terminal=True, color_system="truecolor")
    console.print(Text.from_ansi(done.stdout), end="")
    console.save_svg(str(ROOT / "docs" / "assets" / "audit.svg"), title="clair audit sample_adapters")


if __name__ == "__main__":
    main()
