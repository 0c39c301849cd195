"""The named choices of the command line, as str Enums (StrEnum).

As huggingface_hub's CLI declares ``RepoType``: Typer lists them in ``--help``, completes
them in the shell and refuses a typo, so no layer re-checks the string. A member equals its
value (``Side.OUT == "out"``); the values are those :mod:`clair_cli.params` accepts.
"""

from __future__ import annotations

from enum import StrEnum


class Side(StrEnum):
    """Which space the adapters share: output (column), input (row), or both."""

    OUT = "out"
    IN = "in"
    BOTH = "both"


class SolverForm(StrEnum):
    """The decomposition's form (``--solver``): noise-aware, or noiseless Outlier Pursuit."""

    NOISY = "noisy"
    EXACT = "exact"


class DeviceChoice(StrEnum):
    """Where the decompositions run; ``auto`` takes a GPU when one is present."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(StrEnum):
    """Working precision of the fast path (the convex path always works in float64)."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"


class Rescale(StrEnum):
    """How the clair merge's norm is set: left as it is, or the merged adapters' median norm."""

    NONE = "none"
    NORM = "norm"
