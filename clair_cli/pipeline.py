"""Load -> check -> decompose per module -> decide -> merge or refine.

The commands call these functions; they take a progress callback instead of
printing. Memory is bounded by one module's factors over the pool (plus the
small merged factors): modules are read one at a time from safetensors files
that stay open (memory-mapped) for the whole pass.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Protocol

from clair_cli import methods, numerics
from clair_cli.constants import LAYOUT_NAMES
from clair_cli.errors import AdapterFormatError, IncompatibleAdapters, UsageError
from clair_cli.io.adapter import Adapter
from clair_cli.io.resources import available_memory
from clair_cli.params import AuditParams, MergeOptions
from clair_cli.results import AuditOutcome, MergedAdapter, Pool
from clair_cli.types import MHA_OUT_PROJ, attention_layers

# Stored dtypes (safetensors names) whose every value is exact in float32 and float64.
EXACT_IN_FLOAT32 = frozenset({"F16", "BF16", "F32"})

if TYPE_CHECKING:
    import torch

    from clair_cli.core.audit import ModuleInput
    from clair_cli.core.merge import MergeResult
    from clair_cli.io.safetensors_file import SafetensorsReader
    from clair_cli.io.sources import SourceOptions

Progress = Callable[[str, int, int], None]


class MergeSink(Protocol):
    """Where :func:`merge` puts each merged module as soon as it is computed (the output file)."""

    def put(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Take module ``name``'s merged factors (float32, scale 1)."""

    def rewrite_b(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every ``B`` taken so far by ``fn(B)`` (``--rescale norm``'s second pass)."""


def _quiet(_stage: str, _done: int, _total: int) -> None:
    return None


def _base(name: str | None) -> str | None:
    return name.rstrip("/") if name else None


def _one_spelling(spellings: list[str]) -> str | None:
    """The name written for the pool's base model (outputs' configs and cards), whatever the
    order of the sources: the spelling every adapter uses; where they differ, the hub id
    (``roberta-base`` and ``FacebookAI/roberta-base``: the latter) or, for one local
    directory spelled several ways, the first relative spelling in sorted order (relative
    paths keep outputs portable; each spelling loads as given)."""
    from clair_cli.io.base_model import canonical_base_model, looks_local

    distinct = sorted(set(spellings), key=lambda name: (os.path.isabs(os.path.expanduser(name)), name))
    if not distinct:
        return None
    if len(distinct) == 1 or looks_local(distinct[0]):
        return distinct[0]
    return canonical_base_model(distinct[0])


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
            (without ``intersect``), a module with different shapes, or a different
            ``layer_replication``.
    """
    need = methods.get(method).min_adapters
    if len(adapters) < need:
        raise UsageError(
            f"{method} needs at least {need} adapters, got {len(adapters)}",
            hint="Give more adapters, or a directory that holds them.",
        )
    from clair_cli.io.base_model import canonical_base_model, same_model_note
    from clair_cli.io.lora_config import refuse_mixed_replication

    # Compared by what they name: ./base, base and /abs/base are one directory; gpt2 is
    # openai-community/gpt2 (the Hub's canonical id).
    # A config's revision is the base model's branch, tag or commit (AutoPeftModel loads the base model
    # there); none is PEFT's and transformers' default, main.
    bases: dict[tuple[str, str], tuple[str, Adapter]] = {}
    spellings: list[str] = []
    for a in adapters:
        base = _base(a.base_model)
        if base is not None:
            revision = a.config.base_revision or "main"
            bases.setdefault((canonical_base_model(base), revision), (base, a))
            spellings.append(base)
    if len(bases) > 1:
        ((c1, r1), (b1, a1)), ((c2, r2), (b2, a2)) = list(bases.items())[:2]
        if c1 == c2:
            raise IncompatibleAdapters(
                f"adapters are for different revisions of the base model {b1!r}: {a1.name} is for revision "
                f"{r1!r}, {a2.name} for {r2!r} (their configs' revision, at which AutoPeftModel loads the base model)",
                hint="Audit the adapters of one base model revision at a time, or pass --base-model to name the "
                "base model of all.",
            )
        raise IncompatibleAdapters(
            f"adapters are for different base models: {a1.name} is for {b1!r}, {a2.name} is for {b2!r}",
            hint="Audit the adapters of one base model at a time, or pass --base-model to name it for all.",
        )
    note = same_model_note(spellings)
    refuse_mixed_replication(adapters)
    layout_note = _one_layout(adapters)
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
    notes = [n for n in (note, layout_note) if n]
    return Pool(list(adapters), modules, dropped, _one_spelling(spellings), notes)


def _one_layout(adapters: Sequence[Adapter]) -> str | None:
    """Refuse a pool of several file layouts (PEFT, kohya, diffusers): their module names differ, and
    clair does not translate between them. Returns a note for a pool of diffusion LoRA files.

    Raises:
        IncompatibleAdapters: naming one adapter of each of two layouts.
    """
    first = adapters[0]
    odd = next((a for a in adapters if a.layout != first.layout), None)
    if odd is not None:

        def named(layout: str) -> str:
            return ("an " if layout == "mlx" else "a ") + LAYOUT_NAMES[layout]

        mlx = "mlx" in (first.layout, odd.layout)
        raise IncompatibleAdapters(
            f"{first.name} is {named(first.layout)} LoRA and {odd.name} is {named(odd.layout)} LoRA; "
            "clair compares and merges adapters of one layout",
            hint="Convert them to one layout first ("
            + (
                "examples/mlx_to_peft.py converts an MLX-LM adapter to PEFT's layout"
                if mlx
                else "diffusers loads kohya files and saves them with save_lora_weights"
            )
            + "), or audit each layout on its own.",
        )
    if first.layout == "peft":
        return None
    return f"{LAYOUT_NAMES[first.layout]} LoRA files: merged and refined adapters are written in the same layout"


def open_pool(
    sources: Sequence[str],
    options: SourceOptions | None = None,
    *,
    intersect: bool = False,
    method: str = "clair",
    progress: Progress = _quiet,
) -> Pool:
    """Open the adapters of ``sources`` (:func:`clair_cli.io.sources.open_adapters`) as one pool.

    Raises:
        ClairError: a source that cannot be read, or adapters that cannot be analysed together.
    """
    from clair_cli.io.sources import open_adapters

    adapters = open_adapters(sources, options, lambda _name, done, total: progress("loading adapters", done, total))
    return build_pool(adapters, intersect=intersect, method=method)


def open_gate_pool(
    candidates: Sequence[str],
    references: Sequence[str],
    options: SourceOptions | None = None,
    *,
    intersect: bool = False,
    progress: Progress = _quiet,
) -> tuple[Pool, list[int]]:
    """The pool of ``clair gate``: trusted references first, then candidates; and the references' indices.

    Raises:
        UsageError: no reference, too few references, or an adapter that is both.
    """
    from clair_cli.io.paths import printable
    from clair_cli.io.sources import open_adapters

    if not references:
        raise UsageError("no --reference given", hint="Name the trusted adapters with --reference SOURCE (repeatable).")

    def loading(_name: str, done: int, total: int) -> None:
        progress("loading adapters", done, total)

    refs = open_adapters(references, options, loading)
    cands = open_adapters(candidates, options, loading)
    by_name = {a.name: a for a in refs}
    for cand in cands:
        ref = by_name.get(cand.name)
        if ref is None:
            continue
        if _same_file(ref.ref.weights_file, cand.ref.weights_file):
            raise UsageError(
                f"{printable(cand.name)!r} is both a candidate and a reference adapter",
                hint="A candidate cannot vouch for itself; give it once.",
            )
        raise UsageError(
            f"a candidate and a reference adapter are both named {printable(cand.name)!r} "
            f"({printable(cand.ref.weights_file.as_posix())} and {printable(ref.ref.weights_file.as_posix())})",
            hint="Reports name adapters by their directories: rename one of the two, or put it under another name.",
        )
    need = methods.get("clair").min_adapters
    if len(refs) < need:
        raise UsageError(f"gate needs at least {need} reference adapters, got {len(refs)}")
    return build_pool(refs + cands, intersect=intersect), list(range(len(refs)))


def _same_file(a: os.PathLike, b: os.PathLike) -> bool:
    """Whether two paths name one file (a link or another spelling of the same path included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def extras(pool: Pool, drop: bool) -> list[str]:
    """Refuse to merge what a merge of LoRA factors cannot carry, or (``drop``) list it as dropped.

    Raises:
        IncompatibleAdapters: an adapter holds DoRA magnitudes, LoRA biases, modules_to_save
            weights or trainable tokens, and ``drop`` is false.
    """
    from clair_cli.io.paths import printable

    found = [(a.name, kind, keys) for a in pool.adapters for kind, keys in a.extras.items()]
    if found and not drop:
        name, kind, keys = found[0]
        more = f" (and {len(found) - 1} more such finding(s) in the pool)" if len(found) > 1 else ""
        raise IncompatibleAdapters(
            f"{printable(name)}: holds {kind} ({printable(keys[0])}{', ...' if len(keys) > 1 else ''}) "
            f"that a merge of LoRA factors cannot carry{more}",
            hint="Pass --drop-extras to merge the LoRA updates alone (what is dropped is listed in the "
            "model card and report), or merge adapters without them.",
        )
    return [f"dropped (--drop-extras) from {name}: {len(keys)} {kind}" for name, kind, keys in found]


def pool_from_factors(
    adapters: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]],
    base_model: str | None = None,
    intersect: bool = False,
    method: str = "clair",
) -> Pool:
    """A pool of adapters held in memory, for the same :func:`audit` and :func:`merge` as files.

    Args:
        adapters: per adapter name (in pool order), per module ``(A, B, scale)`` with ``A``
            ``r x d_in``, ``B`` ``d_out x r``; the update is ``scale * B @ A``.
        base_model: the base model the report names.
        intersect, method: as in :func:`build_pool`.

    Raises:
        AdapterFormatError: factors that are not LoRA factors.
        UsageError, IncompatibleAdapters: as :func:`build_pool`.
    """
    from clair_cli.io.memory import MemoryAdapter

    opened = [MemoryAdapter.from_factors(name, modules, base_model) for name, modules in adapters.items()]
    return build_pool(opened, intersect=intersect, method=method)


def iter_modules(
    pool: Pool,
    members: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    progress: Progress = _quiet,
    modules: Sequence[str] | None = None,
    as_given: bool = False,
) -> Iterator[ModuleInput]:
    """Each module's factors for ``members`` (default: every adapter), one module at a time
    (``modules``: those of the pool's modules only, in the pool's order; ``as_given``: factors
    of more precision than ``dtype`` cast as they are, not balanced first, for the methods
    defined on the factors: :func:`~clair_cli.core.canonical.in_dtype`).

    An all-zero adapter (untrained: lora_B starts at zero) is passed on like any other; the
    verdict flags it as a free rider (the norm rule), so the rest of the pool is still audited.
    """
    idx = list(range(len(pool.adapters))) if members is None else list(members)
    with ExitStack() as stack:
        readers = [stack.enter_context(pool.adapters[k].reader()) for k in idx]
        wanted = None if modules is None else set(modules)
        names = pool.modules if wanted is None else [m for m in pool.modules if m in wanted]
        for i, name in enumerate(names):
            yield module_input(pool, name, idx, readers, dtype, device, as_given)  # no local keeps the module
            progress("modules", i + 1, len(names))


def module_input(
    pool: Pool,
    name: str,
    idx: Sequence[int],
    readers: Sequence,
    dtype: torch.dtype | None,
    device: str,
    as_given: bool = False,
) -> ModuleInput:
    """Module ``name``'s factors for the adapters ``idx``, read through their open ``readers``
    (:func:`iter_modules`, and an executor's worker, which reads a module where it runs).

    Raises:
        AdapterFormatError: factors that cannot be cast to ``dtype``, or cannot be read.
    """
    import torch

    from clair_cli.core.audit import ModuleInput

    # Only the factors in the working dtype are held while the module is worked on.
    fitted = [
        _read_fitted(pool.adapters[k], r, name, dtype or torch.float32, as_given)
        for k, r in zip(idx, readers, strict=True)
    ]
    return ModuleInput(
        name,
        list(idx),
        [a.to(device) for a, _b, _s in fitted],
        [b.to(device) for _a, b, _s in fitted],
        [s for _a, _b, s in fitted],
    )


def _read_fitted(
    adapter: Adapter, reader: SafetensorsReader, name: str, dtype: torch.dtype, as_given: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One adapter's factors of module ``name`` in ``dtype``: read in float64 and cast with
    :func:`~clair_cli.core.canonical.in_dtype`, so float64 factors are balanced before they are
    narrowed (their update, not each factor, keeps its precision; factors beyond float32's range
    whose update fits are not cast to Inf or 0)."""
    import torch

    from clair_cli.core.canonical import cast_faithfully, in_dtype
    from clair_cli.io.paths import printable

    spec = adapter.modules[name]
    stored = {reader.tensors[key].dtype for key in (spec.a_key, spec.b_key)}
    if stored <= EXACT_IN_FLOAT32 and dtype in (torch.float32, torch.float64):
        # Every stored value is exact in dtype: read straight into it; only factors whose
        # largest entry is too small for dtype's normal range take the balancing below.
        m = adapter.read_module(reader, name, dtype)
        if cast_faithfully(m.A, m.A) and cast_faithfully(m.B, m.B):  # (one reduction each)
            return m.A, m.B, m.scale
    m = adapter.read_module(reader, name, torch.float64)
    if "F64" in stored:
        _check_float32_load(adapter, name, m.A, m.B)
    try:
        return in_dtype(m.A, m.B, m.scale, dtype, balance=not as_given)
    except ValueError as exc:
        raise AdapterFormatError(
            f"{printable(str(adapter.ref.weights_file))}: module {name!r}: {exc}",
            hint="Use --dtype float64, or check the adapter (clair inspect).",
        ) from None


FLOAT32_LOAD_TOLERANCE = 1e-4  # of the update: float64 factors whose float32 cast moves it more are refused


def _check_float32_load(adapter: Adapter, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Refuse float64 factors whose float32 cast (what PEFT loads into a float32 model) makes
    another update than they do: clair would audit an update PEFT never applies. An outside review
    built such a file: pairs of large terms that differ below float32's resolution read as a benign
    adapter in float64 and cancel exactly in float32, leaving a backdoor's update; clair gate passed
    it. Factors beyond float32's range (which PEFT cannot load faithfully) are left to the balancing
    of :func:`~clair_cli.core.canonical.in_dtype`, as before.

    Raises:
        AdapterFormatError: naming the file and module, and how far the cast moves the update.
    """
    import torch

    from clair_cli.core.canonical import update_difference
    from clair_cli.io.paths import printable

    a32, b32 = A.float(), B.float()
    if not (bool(torch.isfinite(a32).all()) and bool(torch.isfinite(b32).all())):
        return
    *_, moved = update_difference(A, B, a32.double(), b32.double())
    if moved > FLOAT32_LOAD_TOLERANCE:
        raise AdapterFormatError(
            f"{printable(str(adapter.ref.weights_file))}: module {name!r}: its float64 factors make an update that "
            f"their float32 cast, what PEFT loads into a float32 model, moves by {moved:.1%}; clair would audit an "
            "update PEFT does not apply",
            hint="Save the factors in float32 (or as trained): float64 values that float32 cannot hold change the "
            "update.",
        )


# What a worker process of --jobs holds beside its module's work: Python, torch and clair
# (about 260 MiB measured for one process's start; rounded up).
WORKER_BASE_BYTES = 320 << 20
# Bytes the audit keeps per pair of adapters and module until the verdict ends (pool_memory).
POOL_BYTES_PER_PAIR = 64


def local_jobs(jobs: int | str, pool: Pool | None = None, dtype: str = "float32") -> int:
    """``--jobs`` as a number: ``auto`` is this machine's usable CPUs over each task's threads,
    and (given the pool) no more workers than the memory available holds, each with its module's
    work and its own Python and torch (at least one); a number given, at most the first."""
    import torch

    from clair_cli.executors import usable_cpus

    # Each worker runs on the driver's thread count (for the same results): no more workers than
    # the CPUs hold at that count, which a number given is capped at too (a library caller on
    # torch's default threads would otherwise run cores x jobs spinning threads).
    count = max(1, usable_cpus() // max(1, torch.get_num_threads()))
    if jobs != "auto":
        return min(int(jobs), count)
    available = available_memory() if pool is not None else None
    if pool is not None and available is not None:
        need, _module = audit_memory(pool, dtype)
        count = min(count, max(1, (int(0.8 * available) - pool_memory(pool)) // (need + WORKER_BASE_BYTES)))
    return count


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without one is an error."""
    numerics.require()
    import torch

    device = str(getattr(device, "value", device))

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="Use --device cpu or auto.")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: expected auto, cpu or cuda")
    return device


def resolved(params: AuditParams) -> AuditParams:
    """``params`` with its device resolved (``auto`` to ``cuda`` or ``cpu``); checks ``cuda`` is there."""
    from dataclasses import replace

    device = resolve_device(params.device)
    return params if device == params.device else replace(params, device=device)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise UsageError(f"--dtype {name}: expected float32 or float64")
    return table[name]


def audit_memory(pool: Pool, dtype: str = "float32") -> tuple[int, str]:
    """Working memory of the audit's largest module (:func:`clair_cli.core.fastpath.audit_memory_bytes`)
    and its name."""
    from clair_cli.core.fastpath import audit_memory_bytes

    itemsize = 8 if dtype == "float64" else 4
    need, worst = 0, pool.modules[0]
    for m in pool.modules:
        spec = pool.adapters[0].modules[m]
        bytes_ = audit_memory_bytes(sum(a.modules[m].rank for a in pool.adapters), spec.d_out + spec.d_in, itemsize)
        if bytes_ > need:
            need, worst = bytes_, m
    return need, worst


def pool_memory(pool: Pool) -> int:
    """What the audit keeps per module for the verdict, in bytes: a few ``K x K`` float64 matrices
    of each module (its updates' Gram and cosine matrices, and the verdict's copies of them),
    held in the ``clair`` process until the verdict ends, with the verdict's bounded temporaries:
    ``POOL_BYTES_PER_PAIR`` per pair of adapters and module (measured: 45 on 1,000 tiny modules of 128
    adapters; about 65 for an audit and 30 for a gate fitted over MoE-shaped pools of 16-96 adapters and
    100-1,000 modules). It grows with the modules times the square of the pool: 1 GiB for 1,000
    modules of 128 adapters, 9.8 GiB for 10,000."""
    return POOL_BYTES_PER_PAIR * len(pool.modules) * len(pool.adapters) ** 2


def check_audit_memory(pool: Pool, dtype: str = "float32", device: str = "cpu", jobs: int = 1) -> None:
    """Refuse, before reading any factor, a pool whose audit cannot fit in memory: the largest
    module's work (in each of ``jobs`` worker processes) and what the verdict keeps per module
    (:func:`pool_memory`). On a GPU the module's work is the device's (its allocator's own error
    says so) and only the second is checked."""
    cuda = str(device).startswith("cuda")
    need, module = audit_memory(pool, dtype)
    if jobs > 1:  # each worker also holds its own Python, torch and clair
        need += WORKER_BASE_BYTES
    kept = pool_memory(pool)
    total = kept + (0 if cuda else jobs * need)
    available = available_memory()
    if available is None or total <= 0.8 * available:
        return
    each = f" in each of {jobs} worker processes" if jobs > 1 else ""
    n = sum(a.modules[module].rank for a in pool.adapters)
    work = f"{need / 2**30:.1f} GiB for module {module}'s work (summed rank {n}){each}"
    parts = ([] if cuda else [work]) + [
        f"{kept / 2**30:.1f} GiB for the verdict's {len(pool.adapters)} x {len(pool.adapters)} matrices "
        f"of {len(pool.modules)} modules"
    ]
    raise UsageError(
        f"the audit needs about {total / 2**30:.1f} GiB ({' and '.join(parts)}; {len(pool.adapters)} adapters), "
        f"more than the {available / 2**30:.1f} GiB available",
        hint="Audit fewer adapters at once: the verdict's matrices grow with the modules times the square of the "
        "adapters."
        if cuda or kept > need
        else ("Use fewer --jobs. " if jobs > 1 else "")
        + "Audit fewer adapters at once, or lower --max-rank: memory grows with the square of the summed rank.",
    )


def check_merge_memory(pool: Pool, used: Sequence[int], device: str = "cpu") -> None:
    """Refuse, before merging, a merge of the adapters ``used`` whose largest module's work cannot
    fit in memory (:func:`clair_cli.core.fastpath.merge_memory_bytes`; on a GPU, the allocator's
    own error says so)."""
    from clair_cli.core.fastpath import merge_memory_bytes

    available = available_memory()
    if str(device).startswith("cuda") or available is None or not used:
        return
    need, worst, n_worst = 0, pool.modules[0], 0
    for m in pool.modules:
        spec = pool.adapters[0].modules[m]
        n = sum(pool.adapters[k].modules[m].rank for k in used)
        bytes_ = merge_memory_bytes(n, spec.d_out + spec.d_in)
        if bytes_ > need:
            need, worst, n_worst = bytes_, m, n
    if need > 0.8 * available:
        raise UsageError(
            f"the merge needs about {need / 2**30:.1f} GiB for module {worst} ({len(used)} adapters merged, "
            f"summed rank {n_worst}), more than the {available / 2**30:.1f} GiB available",
            hint="Merge fewer adapters at once, or where more memory is available.",
        )


def audit(
    pool: Pool,
    settings: AuditParams,
    progress: Progress = _quiet,
    reference: list[int] | None = None,
    *,
    copies: str = "keep-one",
) -> AuditOutcome:
    """Run CLAIR over the pool (``reference``: trusted adapters, as in ``clair gate``;
    ``copies``: as :class:`clair_cli.core.audit.ClairAuditor`'s)."""
    numerics.require()
    from clair_cli.core.audit import ClairAuditor, EmptyUpdates, VerdictOptions

    start = time.perf_counter()
    asked_device = settings.device
    settings = resolved(settings)
    # No more workers than modules; one runs in this process. A GPU is driven by one process.
    jobs = (
        min(local_jobs(settings.jobs, pool, settings.dtype), len(pool.modules)) if settings.executor == "local" else 1
    )
    if str(settings.device).startswith("cuda") and jobs > 1:
        if settings.jobs != "auto":
            chose = "" if asked_device == settings.device else f", which --device {asked_device} chose"
            raise UsageError(
                f"--jobs {settings.jobs} on the GPU ({settings.device}{chose}): one process drives the GPU",
                hint="Use --jobs with --device cpu, or leave it out.",
            )
        jobs = 1
    check_audit_memory(pool, settings.dtype, settings.device, jobs)
    dtype = torch_dtype(settings.dtype)
    auditor = ClairAuditor(
        method=settings.solver,  # type: ignore[arg-type]
        side=settings.side,  # type: ignore[arg-type]
        rank=settings.rank,  # type: ignore[arg-type]
        dtype=dtype,
        device=settings.device,
        random_state=settings.seed,
        solver=settings.path,  # type: ignore[arg-type]
        verdict=VerdictOptions(threshold=settings.threshold, copies=copies),  # type: ignore[arg-type]
    )
    try:
        if settings.executor == "local" and jobs == 1:
            auditor.fit(
                iter_modules(pool, dtype=dtype, device=settings.device, progress=progress),
                len(pool.adapters),
                reference,
                names=pool.names,
                again=lambda wanted: iter_modules(
                    pool,
                    dtype=dtype,
                    device=settings.device,
                    progress=lambda _stage, done, total: progress("refitting modules", done, total),
                    modules=wanted,
                ),
            )
        else:
            from clair_cli.executors import ProcessExecutor, RayExecutor, executor_fit

            executor = ProcessExecutor(jobs) if settings.executor == "local" else RayExecutor(settings.executor)
            executor_fit(executor, auditor, pool, reference, progress)
    except EmptyUpdates as exc:
        raise IncompatibleAdapters(
            str(exc), hint="Untrained adapters (lora_B starts at zero) carry no update; leave them out."
        ) from None
    return AuditOutcome(pool, settings, auditor, {"audit": time.perf_counter() - start}, reference)


def flag_unanalysed(outcome: AuditOutcome) -> None:
    """Flag a gate's candidates whose files hold what PEFT applies and clair does not analyse
    (:meth:`~clair_cli.io.adapter.Adapter.unanalysed`): a gate cannot vouch for them."""
    from clair_cli.core.rules.base import Reason
    from clair_cli.io.lora_config import ignored_modules
    from clair_cli.io.paths import printable

    trusted = set(outcome.reference or ())
    analysed = set(outcome.pool.modules)

    def parts_of(adapter: Adapter) -> tuple[str, ...]:
        # A module --intersect leaves out (one the references do not target) is applied by PEFT and
        # judged by no rule: a candidate could carry any update there and pass. (Not one PEFT does not load.)
        ignored = set(ignored_modules(adapter.config, adapter.modules)) if adapter.layout == "peft" else set()
        left_out = sorted(set(adapter.modules) - analysed - ignored)
        dropped = (
            [
                f"{len(left_out)} LoRA module(s) that --intersect leaves out ({printable(left_out[0])}"
                + (", ...)" if len(left_out) > 1 else ")")
            ]
            if left_out
            else []
        )
        return tuple(adapter.unanalysed() + dropped)

    flags = {
        k: Reason(kind="unanalysed", rule="unanalysed", value=None, threshold=0, compare=">", margin=None, parts=parts)
        for k, a in enumerate(outcome.pool.adapters)
        if k not in trusted and (parts := parts_of(a))
    }
    outcome.auditor.flag_outright(flags)


def merge(
    pool: Pool,
    method: str,
    settings: AuditParams,
    weights: Sequence[float] | None = None,
    options: MergeOptions | None = None,
    outcome: AuditOutcome | None = None,
    progress: Progress = _quiet,
    sink: MergeSink | None = None,
) -> MergedAdapter:
    """Merge the pool with ``method`` (:mod:`clair_cli.methods`); ``clair`` needs the audit ``outcome``.

    ``clair`` merges the collaborative set (the adapters not flagged): by default their
    exact weighted mean ``sum_k w_k Theta_k`` under the norm bound (``options.norm_bound``:
    an update above it, over all modules or on one, counts as one at the bound), written at
    the smallest rank within ``options.tol`` (or at ``options.rank``); with nothing flagged
    and nothing bounded this is ``mean``, bit for bit. Baselines ignore ``clip`` and
    ``norm_bound``. With ``options.project``, CLAIR's projection ``U U^T`` of that mean, with ``U`` the
    leading directions of the collaborators at a rank chosen for reconstruction (never the
    detection rank). Adapters are taken in a canonical order, so the result does not depend
    on the order of the sources.

    With a ``sink`` (what ``clair merge`` gives: the output file, :class:`MergeSink`), each
    module's factors go to it as soon as they are merged and the returned adapter keeps only
    their shapes (``meta`` tensors): memory is one module's work, not the merged adapter.
    ``--rescale norm`` then scales the written ``B`` factors in a second pass over the sink.
    """
    numerics.require()
    from clair_cli.core.merge import MergeResult, median_norm_factor, merged_sq_norm, squared_norms
    from clair_cli.core.projection import basis_side

    spec = methods.get(method)
    options = options or MergeOptions()
    if not spec.audits:  # bounded influence shapes the clair merge of what the audit lets through
        options = dataclasses.replace(options, clip=None, norm_bound=None)
    settings = resolved(settings)
    dtype = torch_dtype(settings.dtype)
    used = spec.members(len(pool.adapters), outcome)
    check_merge_memory(pool, used, settings.device)
    w = None
    if weights is not None:
        if len(weights) != len(pool.adapters):
            raise UsageError(f"--weights has {len(weights)} values for {len(pool.adapters)} adapters")
        w = [float(weights[k]) for k in used]
        if used and not sum(w) > 0:  # the weights given are the flagged adapters' alone
            raise UsageError(
                f"--weights gives weight 0 to every adapter merged ({len(used)} of {len(pool.adapters)}: those the "
                "audit did not flag); nothing is left to merge",
                hint="Give a positive weight to at least one adapter the audit lets through.",
            )
    weighting = spec.merge_weights(outcome, used, w, options)
    plan = methods.MergePlan(
        used, options, basis_side(settings.side), dtype, settings.path, dict(weighting.norm_bounded)
    )
    sq_norms = dict.fromkeys(used, 0.0)
    merged_sq = 0.0
    written = _Written(pool.modules, sink)
    for given in iter_modules(
        pool, used, dtype=dtype, device=settings.device, progress=progress, as_given=spec.of_factors
    ):
        mod, mw = spec.prepare(given, weighting.weights, dtype, settings.path)
        del given  # only the method's own copy of the module is held while it merges
        if options.rescale != "none":
            for k, sq in zip(mod.members, squared_norms(mod.A, mod.B, mod.scales), strict=True):
                sq_norms[k] += sq
        res = spec.merge_module(mod, mw, plan)
        res = MergeResult(res.A.float().cpu(), res.B.float().cpu(), res.method, res.selected, res.info)
        if options.rescale == "norm":
            merged_sq += merged_sq_norm(res.A, res.B)
        written.add(mod.name, res)
    results = written.finish()
    notes = list(weighting.notes)
    scale = 1.0
    if options.rescale == "norm":
        scale = median_norm_factor(merged_sq, [sq_norms[k] for k in used])
        if scale != 1.0:
            _scale_b(results, sink, scale)
        notes.append(f"--rescale norm: merged update scaled by {scale:.3f} (to the merged adapters' median norm)")
    notes += spec.result_notes(results)
    return MergedAdapter(
        spec.name,
        results,
        used,
        weighting.weights,
        notes,
        options,
        scale,
        weighting.clipped,
        weighting.norm_bounded,
        sink is not None,
        weighting.norm_bound_relative,
    )


def one_rank_pairs(modules: Iterable[str]) -> dict[str, str]:
    """Modules PEFT gives one rank together, each mapped to its peer: a MultiheadAttention layer's
    LoRA and its ``out_proj``'s (:func:`clair_cli.types.attention_layers`)."""
    pairs = {}
    for layer in attention_layers(modules):
        pairs[layer + MHA_OUT_PROJ], pairs[layer] = layer, layer + MHA_OUT_PROJ
    return pairs


class _Written:
    """The merged modules as they come, to the sink (their shapes kept) or kept whole; the two of a
    pair that PEFT gives one rank (:func:`one_rank_pairs`) are held until both are merged, then
    written at the larger of their ranks (zero directions appended: the same updates)."""

    def __init__(self, modules: Iterable[str], sink: MergeSink | None) -> None:
        self.peers = one_rank_pairs(modules)
        self.sink = sink
        self.held: dict[str, MergeResult] = {}
        self.results: dict[str, MergeResult] = {}

    def add(self, name: str, res: MergeResult) -> None:
        peer = self.peers.get(name)
        if peer is None:
            self._emit(name, res)
        elif peer not in self.held:
            self.held[name] = res
        else:
            first = self.held.pop(peer)
            rank = max(first.rank, res.rank)
            self._emit(peer, _with_rank(first, rank))
            self._emit(name, _with_rank(res, rank))

    def finish(self) -> dict[str, MergeResult]:
        """Every module merged, in the order written; one of a pair whose peer never came is
        written as it is (every module of the pool is merged, so none is held here)."""
        for name in list(self.held):
            self._emit(name, self.held.pop(name))
        return self.results

    def _emit(self, name: str, res: MergeResult) -> None:
        if self.sink is None:
            self.results[name] = res
            return
        self.sink.put(name, res.A, res.B)
        meta = res.A.to("meta"), res.B.to("meta")  # the shapes stay; the data is in the sink
        self.results[name] = dataclasses.replace(res, A=meta[0], B=meta[1])


def _with_rank(res: MergeResult, rank: int) -> MergeResult:
    """``res`` written at ``rank`` (at least its own): zero directions appended, the same update."""
    import torch

    extra = rank - res.rank
    if extra <= 0:
        return res
    A = torch.cat([res.A, res.A.new_zeros(extra, res.A.shape[1])])
    B = torch.cat([res.B, res.B.new_zeros(res.B.shape[0], extra)], dim=1)
    return dataclasses.replace(res, A=A, B=B)


def _scale_b(results: Mapping[str, MergeResult], sink: MergeSink | None, factor: float) -> None:
    """Multiply every merged ``B`` by ``factor``: in memory, or in the sink's file."""
    if sink is not None:
        sink.rewrite_b(lambda B: B * factor)
        return
    for r in results.values():
        r.B = r.B * factor


def merged_rank_bound(pool: Pool, options: MergeOptions | None = None) -> dict[str, int]:
    """Per module, a rank no merge of the pool's adapters exceeds (what a :class:`MergeSink`
    reserves room for): the larger of the adapters' summed rank, the module's smaller side
    (a dense merge factored exactly) and ``--merge-rank``, and the larger of a pair's
    (:func:`one_rank_pairs`)."""
    fixed = (options.rank if options is not None else None) or 0
    out = {}
    for m in pool.modules:
        spec = pool.adapters[0].modules[m]
        summed = sum(a.modules[m].rank for a in pool.adapters)
        out[m] = max(summed, min(spec.d_out, spec.d_in), fixed)
    for m, peer in one_rank_pairs(pool.modules).items():  # written at the larger of the two ranks
        out[m] = max(out[m], out[peer])
    return out


def refined_bases(
    pool: Pool, outcome: AuditOutcome, rank: int | None = None, progress: Progress = _quiet
) -> dict[str, torch.Tensor | None]:
    """Per module, the projection basis of the collaborative set.

    ``rank`` fixes the projection rank (``--project-rank``); None chooses it per module by
    cross-validation, as the projected merge does, but never below the module's detected shared
    rank: the cross-validation asks how well the projected *mean* predicts a held-out adapter,
    which counts each adapter's own variation inside the shared subspace as noise, so on its own
    it projects personalised adapters onto fewer directions than they share and removes the
    variation that refinement keeps (docs/engine.md, section 6). A module without shared
    structure (detected rank 0) is kept unchanged, as is one where projection does not help
    (None for both).
    """
    numerics.require()
    from clair_cli.core.audit import at_working_precision, canonical_input
    from clair_cli.core.fastpath import shared_basis
    from clair_cli.core.projection import basis_side, projection_basis

    dtype = torch_dtype(outcome.settings.dtype)
    side = basis_side(outcome.settings.side)
    detected = outcome.auditor.shared_rank_
    out: dict[str, torch.Tensor | None] = {}
    used = outcome.auditor.collaborative_set_
    for given in iter_modules(pool, used, dtype=dtype, device=outcome.settings.device, progress=progress):
        if rank is None and detected.get(given.name, 0) < 1:
            out[given.name] = None  # nothing shared beyond chance: no subspace to refine onto
            continue
        mod, _ = canonical_input(given)
        mod = at_working_precision(mod, dtype, outcome.settings.path)
        basis, q = projection_basis(mod.A, mod.B, mod.scales, side, rank)
        if rank is None and q is not None and q < detected[mod.name]:
            basis = shared_basis(mod.A, mod.B, mod.scales, detected[mod.name], side)
        out[mod.name] = None if basis is None else basis.cpu()
    return out


def refined_factors(
    adapter: Adapter, bases: Mapping[str, torch.Tensor | None], side: str
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """One collaborator's refined factors ``(A~, B~)`` per module with a basis (projected onto
    it, :func:`clair_cli.core.merge.refine`, in float64: thread-count independent), and the
    modules left unchanged (basis None). The writer puts them in place of the adapter's own."""
    import torch

    from clair_cli.core.merge import refine
    from clair_cli.core.projection import basis_side

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unchanged = []
    with adapter.reader() as reader:
        for name, basis in bases.items():
            if basis is None:
                unchanged.append(name)
                continue
            mod = adapter.read_module(reader, name, torch.float64)
            factors[name] = refine(mod.A, mod.B, basis, basis_side(side))
    return factors, unchanged
