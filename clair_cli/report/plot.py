"""The PNG report: per-module score heatmap and the spectra that set the rank."""

from __future__ import annotations

import io
from typing import Any

from clair_cli.errors import UsageError
from clair_cli.io.paths import printable
from clair_cli.report.modules import ModuleNames, natural_key


def plot_labels(report: dict[str, Any]) -> list[str]:
    """The heatmap's column labels: the modules' short names, in layer order."""
    names = [m["name"] for m in report["modules"]]
    labels = ModuleNames(names)
    return [labels.short(m) for m in sorted(names, key=natural_key)]


def plot_png(report: dict[str, Any]) -> bytes:
    """The heatmap (adapters x modules, off-subspace share) and the spectra, as a PNG.

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed", hint="Install it with: pip install 'clair-lora[plot]'"
        ) from None

    adapters = sorted(report["adapters"], key=lambda a: a["name"])
    # Columns in layer order (layer 2 before layer 10), labelled as every report labels them.
    listed = sorted(report["modules"], key=lambda m: natural_key(m["name"]))
    modules = [m["name"] for m in listed]
    grid = [[a["per_module"].get(m, float("nan")) for m in modules] for a in adapters]
    width = min(4 + 0.35 * len(modules), 24)
    height = max(3.5, 0.3 * len(adapters) + 1.5)
    fig, (ax_h, ax_s) = plt.subplots(1, 2, figsize=(width + 6, height), gridspec_kw={"width_ratios": [width, 6]})
    im = ax_h.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=1, interpolation="nearest")
    ax_h.set_yticks(range(len(adapters)))
    # Names are the uploader's: no control characters, and no mathtext ($...$) for matplotlib to parse.
    labels = [("! " if a["flagged"] else "") + printable(a["name"]).replace("$", r"\$") for a in adapters]
    ax_h.set_yticklabels(labels, fontsize=8)
    for tick, a in zip(ax_h.get_yticklabels(), adapters, strict=True):
        if a["flagged"]:
            tick.set_color("crimson")
    short = [s.replace("$", r"\$") for s in plot_labels(report)]
    ax_h.set_xticks(range(len(modules)))
    ax_h.set_xticklabels(short, rotation=90, fontsize=7)
    ax_h.set_title("off-subspace share per module (! = flagged)")
    fig.colorbar(im, ax=ax_h, fraction=0.03)

    for m, label in zip(listed, short, strict=True):
        spec = m["spectrum"]
        (line,) = ax_s.plot(range(1, len(spec) + 1), spec, lw=1, alpha=0.6, label=f"{label} (r={m['rank']})")
        if m["null_bound"]:
            nb = m["null_bound"]
            ax_s.plot(range(1, len(nb) + 1), nb, ls="--", lw=0.8, color=line.get_color(), alpha=0.4)
        if m["rank"] > 0:
            ax_s.plot([m["rank"]], [spec[m["rank"] - 1]], "o", color=line.get_color())
    ax_s.set_xlabel("index")
    ax_s.set_ylabel("singular value (unit-norm adapters)")
    ax_s.set_title("spectra; dashed: chance level; dot: chosen rank")
    if len(modules) <= 8:
        ax_s.legend(fontsize=7)
    fig.tight_layout()

    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=110, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()
