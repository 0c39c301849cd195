"""Load -> check -> decompose per module -> decide -> merge or refine.

The commands call these functions; they take a progress callback instead of
printing. Memory is bounded by one module's factors over the pool (plus the
small merged factors): modules are read one at a time from safetensors files
that stay open (memory-mapped) for the whole pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clair_cli.errors import AdapterFormatError, IncompatibleAdapters, UsageError
from clair_cli.io.adapter import Adapter

if TYPE_CHECKING:
    import torch

    from clair_cli.core.audit import ClairAuditor, ModuleInput
    from clair_cli.core.baselines import MergeResult

Progress = Callable[[str, int, int], None]
MERGE_METHODS = ("clair", "mean", "fedavg", "median", "trimmed-mean", "krum", "multi-krum", "ties")
# Fewest adapters each method can work with. CLAIR: its robust centre (median / MAD) needs a
# benign majority, and below five adapters parallel analysis misses real shared directions
# often enough to flag benign adapters (measured on 16-dim toy pools).
MIN_ADAPTERS = {"clair": 5, "krum": 3, "multi-krum": 3, "median": 2, "trimmed-mean": 3, "ties": 2}


def _quiet(_stage: str, _done: int, _total: int) -> None:
    return None


@dataclass
class Pool:
    """Adapters that can be analysed together.

    Attributes:
        adapters: opened adapters, in source order.
        modules: the modules analysed (sorted).
        dropped: modules left out by ``--intersect`` (not targeted by every adapter).
        base_model: the common base model (None when no config names one).
    """

    adapters: list[Adapter]
    modules: list[str]
    dropped: list[str] = field(default_factory=list)
    base_model: str | None = None

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]


def _base(name: str | None) -> str | None:
    return name.rstrip("/") if name else None


def build_pool(adapters: Sequence[Adapter], intersect: bool = False, method: str = "clair") -> Pool:
    """Check that the adapters can be analysed together.

    Args:
        adapters: opened adapters.
        intersect: analyse the modules every adapter targets instead of refusing
            adapters that target different modules.
        method: the method that will run (it sets the minimum pool size).

    Raises:
        UsageError: too few adapters for the method.
        IncompatibleAdapters: different base models, different target modules
            (without ``intersect``), or a module with different shapes.
    """
    need = MIN_ADAPTERS.get(method, 1)
    if len(adapters) < need:
        raise UsageError(
            f"{method} needs at least {need} adapters, got {len(adapters)}",
            hint="Give more adapters, or a directory that holds them.",
        )
    bases: dict[str, Adapter] = {}
    for a in adapters:
        base = _base(a.base_model)
        if base is not None:
            bases.setdefault(base, a)
    if len(bases) > 1:
        (b1, a1), (b2, a2) = list(bases.items())[:2]
        raise IncompatibleAdapters(
            f"adapters are for different base models: {a1.name} is for {b1!r}, {a2.name} is for {b2!r}",
            hint="Audit the adapters of one base model at a time.",
        )
    sets = [set(a.modules) for a in adapters]
    common = set.intersection(*sets)
    union = set.union(*sets)
    dropped = sorted(union - common)
    if dropped and not intersect:
        odd = next(a for a, s in zip(adapters, sets, strict=True) if s != sets[0])
        only_one = sorted(sets[0] ^ set(odd.modules))
        raise IncompatibleAdapters(
            f"{adapters[0].name} and {odd.name} target different modules ({len(only_one)} differ, e.g. {only_one[0]})",
            hint="Pass --intersect to analyse only the modules every adapter targets.",
        )
    if not common:
        raise IncompatibleAdapters("the adapters have no module in common")
    modules = sorted(common)
    for m in modules:
        ref = adapters[0].modules[m]
        for a in adapters[1:]:
            spec = a.modules[m]
            if (spec.d_out, spec.d_in, spec.kind, spec.weight_shape) != (
                ref.d_out,
                ref.d_in,
                ref.kind,
                ref.weight_shape,
            ):
                raise IncompatibleAdapters(
                    f"module {m}: {adapters[0].name} has a {ref.kind} update of {ref.d_out}x{ref.d_in}, "
                    f"{a.name} has a {spec.kind} update of {spec.d_out}x{spec.d_in}",
                    hint="Adapters of one base model have equal shapes; check the base models.",
                )
    return Pool(list(adapters), modules, dropped, _base(next(iter(bases), None)))


def iter_modules(
    pool: Pool,
    members: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    progress: Progress = _quiet,
) -> Iterator[ModuleInput]:
    """Each module's factors for ``members`` (default: every adapter), one module at a time."""
    from clair_cli.core.audit import ModuleInput

    idx = list(range(len(pool.adapters))) if members is None else list(members)
    trained = [False] * len(idx)
    with ExitStack() as stack:
        readers = [stack.enter_context(pool.adapters[k].reader()) for k in idx]
        for i, name in enumerate(pool.modules):
            mods = [pool.adapters[k].read_module(r, name, dtype) for k, r in zip(idx, readers, strict=True)]
            for j, m in enumerate(mods):
                trained[j] = trained[j] or (bool(m.A.any()) and bool(m.B.any()))
            if i == len(pool.modules) - 1 and not all(trained):
                raise AdapterFormatError(
                    f"{pool.adapters[idx[trained.index(False)]].ref.weights_file}: every analysed LoRA update "
                    "is zero (an untrained adapter: lora_B is initialised to zero)",
                    hint="Leave it out of the pool, or check that training saved the right weights.",
                )
            yield ModuleInput(
                name,
                list(idx),
                [m.A.to(device) for m in mods],
                [m.B.to(device) for m in mods],
                [m.scale for m in mods],
            )
            progress("modules", i + 1, len(pool.modules))


@dataclass
class Settings:
    """What the user chose (the ``params`` of the JSON report)."""

    method: str = "noisy"
    side: str = "out"
    rank: int | str = "auto"
    threshold: float | None = None
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    solver: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="Use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: expected auto, cpu or cuda")
    return device


def torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise UsageError(f"--dtype {name}: expected float32 or float64")
    return table[name]


@dataclass
class AuditOutcome:
    pool: Pool
    settings: Settings
    auditor: ClairAuditor
    timing: dict[str, float]
    reference: list[int] | None = None


def audit(
    pool: Pool, settings: Settings, progress: Progress = _quiet, reference: list[int] | None = None
) -> AuditOutcome:
    """Run CLAIR over the pool (``reference``: trusted adapters, as in ``clair gate``)."""
    from clair_cli.core.audit import ClairAuditor

    start = time.perf_counter()
    dtype = torch_dtype(settings.dtype)
    auditor = ClairAuditor(
        method=settings.method,  # type: ignore[arg-type]
        side=settings.side,  # type: ignore[arg-type]
        rank=settings.rank,  # type: ignore[arg-type]
        threshold=settings.threshold,
        dtype=dtype,
        device=settings.device,
        random_state=settings.seed,
        solver=settings.solver,  # type: ignore[arg-type]
    )
    auditor.fit(
        iter_modules(pool, dtype=dtype, device=settings.device, progress=progress), len(pool.adapters), reference
    )
    return AuditOutcome(pool, settings, auditor, {"audit": time.perf_counter() - start}, reference)


@dataclass
class MergedAdapter:
    """One merged LoRA: per module ``(A, B)`` with scale 1, and how it was made."""

    method: str
    modules: dict[str, MergeResult]
    used: list[int]
    weights: list[float] | None
    notes: list[str] = field(default_factory=list)


def _at_working_precision(mod: ModuleInput, dtype: torch.dtype, solver: str) -> ModuleInput:
    """The module in the audit's working precision (float64 where the convex path ran)."""
    from clair_cli.core.audit import ModuleInput, working_dtype

    work = working_dtype(mod.A, dtype, solver)
    if work == mod.A[0].dtype:
        return mod
    return ModuleInput(mod.name, mod.members, [a.to(work) for a in mod.A], [b.to(work) for b in mod.B], mod.scales)


def _basis_side(side: str) -> str:
    # Refinement and merge project onto one side; "both" uses the output side.
    return "in" if side == "in" else "out"


def merge(
    pool: Pool,
    method: str,
    settings: Settings,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    outcome: AuditOutcome | None = None,
    progress: Progress = _quiet,
) -> MergedAdapter:
    """Merge the pool with ``method``; ``clair`` needs the audit ``outcome``.

    For ``clair``, each module's shared basis is re-estimated on the collaborative
    set (the adapters not flagged) at the audited rank, then
    ``Theta_bar = sum_k w_k U U^T Theta_k``. A module where the audit found no
    shared structure has no subspace to project on: it gets the exact mean of the
    collaborators instead, and a note says so.
    """
    from clair_cli.core import baselines
    from clair_cli.core.baselines import MergeResult
    from clair_cli.core.fastpath import shared_basis
    from clair_cli.core.merge import merge as clair_merge

    dtype = torch_dtype(settings.dtype)
    notes: list[str] = []
    if method == "clair":
        if outcome is None:
            raise ValueError("the clair merge needs an audit outcome")
        used = list(outcome.auditor.collaborative_set_)
        if not used:
            raise UsageError("every adapter was flagged: there is nothing to merge")
    else:
        used = list(range(len(pool.adapters)))
        fn = baselines.get(method)
    w = None
    if weights is not None:
        if len(weights) != len(pool.adapters):
            raise UsageError(f"--weights has {len(weights)} values for {len(pool.adapters)} adapters")
        w = [float(weights[k]) for k in used]
    side = _basis_side(settings.side)
    results: dict[str, MergeResult] = {}
    no_structure = []
    for mod in iter_modules(pool, used, dtype=dtype, device=settings.device, progress=progress):
        if method == "clair":
            assert outcome is not None
            mod = _at_working_precision(mod, dtype, settings.solver)
            r = rank or outcome.auditor.shared_rank_[mod.name]
            if r == 0:
                no_structure.append(mod.name)
                res = baselines.mean(mod.A, mod.B, mod.scales, w)
                res.method = "mean"
            else:
                basis = shared_basis(mod.A, mod.B, mod.scales, r, side)
                a, b = clair_merge(mod.A, mod.B, mod.scales, basis, w, side=side)
                res = MergeResult(a, b, "clair", used, {"rank": r})
        else:
            try:
                res = fn(mod.A, mod.B, mod.scales, w, rank)
            except ValueError as exc:
                raise UsageError(f"{method}: {exc}") from None
        results[mod.name] = MergeResult(res.A.float().cpu(), res.B.float().cpu(), res.method, res.selected, res.info)
    if no_structure:
        notes.append(
            f"{len(no_structure)} module(s) without shared structure were merged by the plain mean "
            f"of the collaborators: {', '.join(no_structure[:4])}{', ...' if len(no_structure) > 4 else ''}"
        )
    return MergedAdapter(method, results, used, w, notes)


def refined_bases(
    pool: Pool, outcome: AuditOutcome, rank: int | None = None, progress: Progress = _quiet
) -> dict[str, torch.Tensor | None]:
    """Per module, the shared basis on the collaborative set (None where there is no shared structure)."""
    from clair_cli.core.fastpath import shared_basis

    dtype = torch_dtype(outcome.settings.dtype)
    side = _basis_side(outcome.settings.side)
    out: dict[str, torch.Tensor | None] = {}
    used = outcome.auditor.collaborative_set_
    for mod in iter_modules(pool, used, dtype=dtype, device=outcome.settings.device, progress=progress):
        mod = _at_working_precision(mod, dtype, outcome.settings.solver)
        r = rank or outcome.auditor.shared_rank_[mod.name]
        out[mod.name] = shared_basis(mod.A, mod.B, mod.scales, r, side).cpu() if r else None
    return out
