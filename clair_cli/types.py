"""Small dataclasses shared by the layers: where an adapter comes from, what its
config says, and one module's LoRA factors.

Heavy libraries are imported lazily so that ``clair --help`` stays instant.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clair_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

ModuleKind = Literal["linear", "embedding", "conv"]


# The named choices of the command line, as str Enums (StrEnum) (as huggingface_hub's CLI declares
# RepoType): Typer lists them in --help, completes them in the shell and refuses a typo, so no
# layer re-checks the string. A member equals its value (``Side.OUT == "out"``).
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


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def _choice(option: str, value: Any, choices: type[Enum]) -> str:
    text = _value(value)
    allowed = [c.value for c in choices]
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
    """

    solver: str = SolverForm.NOISY.value
    side: str = Side.OUT.value
    rank: int | str = "auto"
    threshold: float | None = None
    dtype: str = Precision.FLOAT32.value
    device: str = DeviceChoice.CPU.value
    seed: int = 0
    path: str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "solver", _choice("--solver", self.solver, SolverForm))
        set_(self, "side", _choice("--side", self.side, Side))
        set_(self, "dtype", _choice("--dtype", self.dtype, Precision))
        set_(self, "rank", parse_rank(self.rank))
        device = str(_value(self.device))
        if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
            raise UsageError(f"--device {device}: expected auto, cpu or cuda")
        set_(self, "device", device)
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise UsageError(f"--threshold {self.threshold}: expected a share between 0 and 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed {self.seed}: expected a whole number from 0 to 2**32-1")
        if self.path not in ("auto", "convex", "fast"):
            raise UsageError(f"path {self.path!r}: expected auto, convex or fast")

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
class AdapterRef:
    """Where one adapter's files are, and how to name it in reports.

    Attributes:
        name: display name (relative path under a pool directory, or hub repo id).
        source: the source as the user gave it.
        weights_file: the ``.safetensors`` file.
        config_file: ``adapter_config.json`` or ``None`` when given by flags.
        revision: resolved hub commit sha, ``None`` for local sources.
        path: a local adapter's own path, spelled from the source as given (relative
            stays relative); ``None`` for hub sources.
        repo_id: the hub repo id, ``None`` for local sources.
        requested_revision: the hub revision asked for (``@v2``), ``None`` when none was.
        subfolder: the folder inside the hub repo, if any.
    """

    name: str
    source: str
    weights_file: Path
    config_file: Path | None
    revision: str | None = None
    path: str | None = None
    repo_id: str | None = None
    requested_revision: str | None = None
    subfolder: str | None = None


# A pattern whose only metacharacter is "." (the usual "layers.0.q_proj"): matched without
# the regex engine, with exactly PEFT's meaning ("." is any character).
_PLAIN_PATTERN = re.compile(r"^[A-Za-z0-9_\-.]+$")
MAX_PATTERN_LENGTH = 512
MAX_PATTERNS = 4096
MAX_UNBOUNDED_REPEATS = 3


def _plain_match(key: str, module: str) -> bool:
    """PEFT's ``re.match(rf"(.*\.)?({key})$", module)`` for a key of fixed length L: the key
    matches the module's last L characters, and what precedes them is empty or ends with "."."""
    n = len(key)
    if len(module) < n or (len(module) > n and module[-n - 1] != "."):
        return False
    return all(k == "." or k == c for k, c in zip(key, module[-n:], strict=True))


def pattern_risk(key: str) -> str | None:
    """Why matching ``key`` (a rank_pattern / alpha_pattern key) could take unbounded time, or ``None``.

    Backtracking blows up on a repetition whose body can itself repeat or branch (``(a+)+``,
    ``(a|ab)*``) and on backreferences; those are refused, as are very long patterns and more
    than a few unbounded repetitions. Everything PEFT's own examples use passes.
    """
    if len(key) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    if _PLAIN_PATTERN.match(key):
        return None
    try:
        from re import _constants as c  # type: ignore[attr-defined]
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_constants as c  # type: ignore[no-redef]
        import sre_parse as parser  # type: ignore[no-redef]
    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT))
    unbounded = 0

    def walk(items: Any, in_repeat: bool) -> str | None:
        nonlocal unbounded
        for op, av in items:
            if op in (c.GROUPREF, c.GROUPREF_EXISTS):
                return "uses a backreference"
            if op in repeats:
                lo, hi, body = av
                if hi > 1:
                    if in_repeat:
                        return "nests one repetition inside another (catastrophic backtracking)"
                    unbounded += hi == c.MAXREPEAT
                    why = walk(body, True)
                    if why:
                        return why
                else:
                    why = walk(body, in_repeat)
                    if why:
                        return why
            elif op == c.BRANCH:
                if in_repeat:
                    return "repeats an alternation (catastrophic backtracking)"
                for branch in av[1]:
                    why = walk(branch, in_repeat)
                    if why:
                        return why
            elif op == c.SUBPATTERN:
                why = walk(av[3], in_repeat)
                if why:
                    return why
            elif op in (c.ASSERT, c.ASSERT_NOT):
                why = walk(av[1], in_repeat)
                if why:
                    return why
            elif op == getattr(c, "ATOMIC_GROUP", None):
                why = walk(av, in_repeat)
                if why:
                    return why
        return None

    try:
        why = walk(parser.parse(key), False)
    except Exception as exc:  # noqa: BLE001 - re's own parser errors, reported as an invalid pattern
        return f"is not a valid regular expression ({exc})"
    if why is None and unbounded > MAX_UNBOUNDED_REPEATS:
        why = f"has more than {MAX_UNBOUNDED_REPEATS} unbounded repetitions"
    return why


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # Same rule as peft.utils.other.get_pattern_key: the first pattern that matches
    # a dotted suffix of the module name wins. Keys were checked by pattern_risk when the
    # config was read; plain keys skip the regex engine.
    for key in patterns:
        if _PLAIN_PATTERN.match(key):
            if _plain_match(key, module):
                return key
        elif re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that decide what an adapter's update is."""

    peft_type: str = "LORA"
    base_model: str | None = None
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()
    trainable_token_indices: Any = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # sha256 of the config file's bytes as read and that file's name (None for a config built from flags).
    sha256: str | None = field(default=None, compare=False, repr=False)
    file_name: str | None = field(default=None, compare=False, repr=False)

    def rank_for(self, module: str) -> int:
        """Rank PEFT gives ``module``: ``rank_pattern`` first, then ``r``."""
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """Alpha PEFT gives ``module``: ``alpha_pattern`` first, then ``lora_alpha``."""
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale_for(self, module: str, r: int | None = None) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        rank = self.rank_for(module) if r is None else r
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @property
    def scale_rule(self) -> str:
        rule = "alpha/sqrt(r)" if self.use_rslora else "alpha/r"
        if self.rank_pattern or self.alpha_pattern:
            rule += " (per-module patterns)"
        return rule


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA update ``scale * B @ A`` in factored form.

    ``A`` is ``r x d_in`` and ``B`` is ``d_out x r`` whatever the layer type (conv
    kernels are flattened into ``d_in``; embeddings have ``d_in`` = vocabulary
    size). ``fan_in_fan_out`` records that the base layer stores its weight
    transposed, as GPT-2's Conv1D does, so PEFT's delta weight is the transpose.
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: ModuleKind = "linear"
    fan_in_fan_out: bool = False
    weight_shape: tuple[int, ...] | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        """Dense update ``scale * B @ A`` (``d_out x d_in``). Small modules and tests only."""
        return self.scale * (self.B @ self.A)

    def delta_weight(self) -> torch.Tensor:
        """The update in the base layer's own weight layout, as PEFT's ``get_delta_weight``."""
        delta = self.delta()
        if self.kind == "embedding" or self.fan_in_fan_out:
            delta = delta.T
        if self.weight_shape is not None and self.kind == "conv":
            delta = delta.reshape(self.weight_shape)
        return delta
