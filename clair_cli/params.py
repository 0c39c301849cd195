"""What a run was asked to do, checked once: the audit's parameters and the merge's options.

Built once from the command line's options (or by a library caller) and passed whole to the
pipeline; every value is checked here, so no layer below re-checks a string. Stdlib only: the
command line's choices (:mod:`clair_cli.cli.choices`) are Enums of the values named here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from clair_cli.constants import NORM_BOUND
from clair_cli.errors import UsageError

# The values each choice takes; the command line's Enums list the same (tests/test_cli_options.py).
SIDES = ("out", "in", "both")
SOLVER_FORMS = ("noisy", "exact")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("float32", "float64")
RESCALES = ("none", "norm")
PATHS = ("auto", "convex", "fast")

# Relative Frobenius error allowed when the merged update is written at a lower rank
# (--merge-tol): far below the differences between adapters, and below bf16 rounding (4e-3).
DEFAULT_MERGE_TOL = 1e-3


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def _choice(option: str, value: Any, allowed: tuple[str, ...]) -> str:
    text = _value(value)
    if text not in allowed:
        raise UsageError(f"{option} {text}: expected one of {', '.join(allowed)}")
    return str(text)


def parse_rank(rank: int | str, option: str = "--rank") -> int | Literal["auto"]:
    """``auto`` or a positive whole number (also given as text, as on the command line)."""
    if rank == "auto":
        return "auto"
    try:
        value = int(rank)
    except (TypeError, ValueError):
        value = 0
    if isinstance(rank, bool) or value < 1 or (isinstance(rank, float) and rank != value):
        raise UsageError(f"{option} {rank}: expected 'auto' or a positive integer")
    return value


def parse_jobs(jobs: int | str) -> int | Literal["auto"]:
    """``--jobs``: ``auto`` or a whole number of worker processes, at least 1."""
    text = str(_value(jobs)).strip()
    if text == "auto":
        return "auto"
    if isinstance(jobs, bool) or not re.fullmatch(r"\d{1,4}", text) or int(text) < 1:
        raise UsageError(f"--jobs {text}: expected a number of worker processes (1 to 9999) or auto")
    return int(text)


@dataclass(frozen=True, kw_only=True)
class AuditParams:
    """What the audit was asked to do, built once from the options and passed whole.

    Every value is checked here, once; Enum members are stored as their plain values, so
    the object compares and serialises as text (the ``params`` of the JSON report).

    Attributes:
        solver: the decomposition's form (``--solver``): ``noisy`` or ``exact``.
        side: the shared space (``--side``): ``out``, ``in`` or ``both``.
        rank: detection rank, ``auto`` (parallel analysis) or a positive number.
        threshold: fixed off-subspace share in (0, 1), or None for the automatic rule.
        dtype: working precision, ``float32`` or ``float64``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``; the pipeline resolves ``auto``.
        seed: seed of the random rotations, 0 to 2**32-1.
        path: which decomposition runs per module: ``auto`` (fast path for large modules),
            ``convex`` or ``fast`` (the ``solver`` argument of
            :class:`clair_cli.core.audit.ClairAuditor`).
        executor: where the per-module work runs (``--executor``): ``local`` (this process),
            ``ray`` (a Ray cluster: ``RAY_ADDRESS``, one running on this machine, or a new
            local one) or ``ray://HOST:PORT`` (a remote cluster through Ray Client). It changes
            no result, so the report's ``params`` leave it out.
        jobs: with the local executor, how many worker processes of this machine run the
            modules (``--jobs``): 1 (this process, the default), a larger number, or ``auto``
            (this machine's usable CPUs over the threads each task uses). Changes no result.
    """

    solver: str = "noisy"
    side: str = "out"
    rank: int | str = "auto"
    threshold: float | None = None
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    path: str = "auto"
    executor: str = "local"
    jobs: int | str = 1  # a number or "auto"; text as on the command line is parsed

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "solver", _choice("--solver", self.solver, SOLVER_FORMS))
        set_(self, "side", _choice("--side", self.side, SIDES))
        set_(self, "dtype", _choice("--dtype", self.dtype, PRECISIONS))
        set_(self, "rank", parse_rank(self.rank))
        device = str(_value(self.device))
        if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
            raise UsageError(f"--device {device}: expected auto, cpu or cuda")
        set_(self, "device", device)
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise UsageError(f"--threshold {self.threshold}: expected a share between 0 and 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed {self.seed}: expected a whole number from 0 to 2**32-1")
        if self.path not in PATHS:
            raise UsageError(f"path {self.path!r}: expected auto, convex or fast")
        executor = str(_value(self.executor)).strip()
        port = re.fullmatch(r"ray://[^\s/]+:(\d{1,5})", executor)
        if executor not in ("local", "ray") and not (port and 0 < int(port.group(1)) < 65536):
            # (a port past 65535 would be taken modulo 65536 by the resolver: another port)
            raise UsageError(f"--executor {executor}: expected local, ray or ray://HOST:PORT (a port from 1 to 65535)")
        set_(self, "executor", executor)
        set_(self, "jobs", parse_jobs(self.jobs))
        if self.jobs != 1 and executor != "local":
            raise UsageError(
                f"--jobs {self.jobs} with --executor {executor}: a Ray cluster runs as many tasks as it has CPUs"
            )

    def as_dict(self) -> dict[str, Any]:
        """The ``params`` section of the JSON report (its keys predate ``--solver``)."""
        return {
            "method": self.solver,
            "side": self.side,
            "rank": self.rank,
            "threshold": self.threshold,
            "dtype": self.dtype,
            "device": self.device,
            "seed": self.seed,
            "solver": self.path,
        }


@dataclass(frozen=True)
class MergeOptions:
    """How the merged update is formed and written (the ``merge`` section of the JSON report).

    Attributes:
        rank: rank of the written LoRA (``--merge-rank``); None: the smallest rank whose
            relative Frobenius error is at most ``tol``.
        tol: that tolerance (``--merge-tol``).
        project: CLAIR's projected merge ``U U^T`` (``--project``) instead of the exact mean.
        project_rank: the projection's rank (``--project-rank``); None: chosen per module by
            cross-validation across the collaborators (:mod:`clair_cli.core.projection`).
        rescale: ``"norm"`` scales the merged update so its norm is the median of the merged
            adapters' norms (averaging separately trained updates shrinks them); ``"none"``.
        clip: bounded influence of the adapters the audit lets through (``--clip``): centred
            clipping at this many times their median distance from their geometric median
            (:mod:`clair_cli.core.influence`); None merges their plain weighted mean.
        norm_bound: a norm bound on the same adapters (``--norm-bound``), applied before the
            clipping: each update's weight scaled down so that it counts as an update of
            this many times their median norm, over all modules and on each module (widened
            where their norms spread; :func:`clair_cli.core.influence.norm_bound`); on by
            default at ``NORM_BOUND`` (1.5); None: no bound (``--norm-bound off``). Baseline
            methods run no audit and ignore it, as ``clip``.
    """

    rank: int | None = None
    tol: float = DEFAULT_MERGE_TOL
    project: bool = False
    project_rank: int | None = None
    rescale: str = "none"
    clip: float | None = None
    norm_bound: float | None = NORM_BOUND

    def __post_init__(self) -> None:
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise UsageError(f"--clip {self.clip}: expected a positive number, or off")
        if self.norm_bound is not None and not (math.isfinite(self.norm_bound) and self.norm_bound >= 1):
            raise UsageError(f"--norm-bound {self.norm_bound}: expected a number of at least 1 (times the median norm)")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--merge-rank {self.rank}: expected a positive integer")
        if not 0 <= self.tol < 1:
            raise UsageError(f"--merge-tol {self.tol}: expected a number in [0, 1)")
        if self.project_rank is not None and self.project_rank < 1:
            raise UsageError(f"--project-rank {self.project_rank}: expected a positive integer")
        rescale = _value(self.rescale)
        if rescale not in RESCALES:
            raise UsageError(f"--rescale {rescale}: expected one of {', '.join(RESCALES)}")
        object.__setattr__(self, "rescale", rescale)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
