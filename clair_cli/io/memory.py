"""Adapters held in memory: per module ``(A, B, scale)``, as a federated server receives them.

:class:`MemoryAdapter` has the interface of :class:`clair_cli.io.adapter.Adapter`
(module table, ``reader()``, ``read_module()``), so a pool of them goes through the
same pipeline as adapters read from disk (:func:`clair_cli.pipeline.pool_from_factors`).
Nothing here touches a file.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clair_cli.errors import AdapterFormatError
from clair_cli.io.adapter import TORCH_DTYPE_NAMES, Adapter, ModuleSpec
from clair_cli.types import AdapterConfig, AdapterRef

if TYPE_CHECKING:
    import torch

MEMORY_SOURCE_PREFIX = "memory:"
_SAFETENSORS_DTYPE = {f"torch.{name}": code for code, name in TORCH_DTYPE_NAMES.items()}

Factors = tuple["torch.Tensor", "torch.Tensor", float]


class _MemoryReader:
    """The reader of a :class:`MemoryAdapter`: tensors by key, as a context manager."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __enter__(self) -> _MemoryReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get_many(self, names: Sequence[str]) -> list[torch.Tensor]:
        return [self.tensors[name] for name in names]


class MemoryAdapter(Adapter):
    """An adapter whose factors are tensors in memory (``A``: ``r x d_in``, ``B``: ``d_out x r``).

    Each module carries its own scale, so updates that are not one LoRA of one config
    (a client's change ``s B_k A_k - s B_g A_g`` written as factors of rank ``2 r``) are
    described exactly.
    """

    def file_digests(self) -> dict[str, str]:
        """No files: the factors came from memory."""
        return {}

    @classmethod
    def from_factors(
        cls,
        name: str,
        modules: Mapping[str, Factors],
        base_model: str | None = None,
        fan_in_fan_out: bool = False,
    ) -> MemoryAdapter:
        """Check the factors and build the module table.

        Raises:
            AdapterFormatError: no module, a factor that is not a floating-point matrix,
                ranks that do not match, or a non-finite scale.
        """

        if not isinstance(name, str):
            raise AdapterFormatError(f"adapter names must be strings, got {type(name).__name__} {str(name)[:80]!r}")
        if not modules:
            raise AdapterFormatError(f"{name}: no LoRA module given")
        specs: dict[str, ModuleSpec] = {}
        tensors: dict[str, torch.Tensor] = {}
        if not all(isinstance(module, str) for module in modules):
            raise AdapterFormatError(f"{name}: module names must be strings")
        for module in sorted(modules):
            A, B, scale = modules[module]
            _check_factors(name, module, A, B, scale)
            dtype = _SAFETENSORS_DTYPE.get(str(A.dtype), "F32")
            specs[module] = ModuleSpec(
                name=module,
                kind="linear",
                a_key=f"{module}.lora_A.weight",
                b_key=f"{module}.lora_B.weight",
                rank=int(A.shape[0]),
                d_in=int(A.shape[1]),
                d_out=int(B.shape[0]),
                scale=float(scale),
                dtype=dtype,
            )
            tensors[specs[module].a_key] = A.detach()
            tensors[specs[module].b_key] = B.detach()
        ref = AdapterRef(name=name, source=MEMORY_SOURCE_PREFIX + name, weights_file=Path(name), config_file=None)
        config = AdapterConfig(base_model=base_model, fan_in_fan_out=fan_in_fan_out)
        n_params = sum(int(t.numel()) for t in tensors.values())
        size = sum(int(t.numel()) * t.element_size() for t in tensors.values())
        adapter = cls(ref, config, specs, [], file_size=size, n_params=n_params)
        adapter._tensors = tensors
        return adapter

    _tensors: dict[str, torch.Tensor]

    def for_module(self, module: str, absolute: bool = True) -> MemoryAdapter:
        """A copy that holds one module's factors (and no notes or extras; no file to name)."""
        out = copy.copy(self)
        spec = self.modules[module]
        out.modules = {module: spec}
        out.notes, out.extras = [], {}
        # A view into a larger tensor (one flat buffer of several factors) would carry all of it
        # to a worker: such factors are copied on their own.
        out._tensors = {key: _own(self._tensors[key]) for key in (spec.a_key, spec.b_key)}
        return out

    def reader(self) -> _MemoryReader:  # type: ignore[override]
        return _MemoryReader(self._tensors)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied where it is a view of a larger storage."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _check_factors(name: str, module: str, A: Any, B: Any, scale: Any) -> None:
    """Refuse what is not one module's LoRA factors (:meth:`MemoryAdapter.from_factors`).

    Raises:
        AdapterFormatError: naming the adapter, the module and the problem.
    """
    import torch

    def bad(problem: str) -> AdapterFormatError:
        return AdapterFormatError(f"{name}: module {module[:200]!r}: {problem}")

    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise bad("factors must be torch tensors")
    if A.layout != torch.strided or B.layout != torch.strided or A.is_meta or B.is_meta:
        raise bad(
            f"factors must be dense tensors with values, got A {A.layout}{' (meta)' if A.is_meta else ''} "
            f"and B {B.layout}{' (meta)' if B.is_meta else ''}"
        )
    if A.dim() != 2 or B.dim() != 2:
        raise bad(f"factors must be matrices, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if not A.is_floating_point() or not B.is_floating_point():
        raise bad(f"factors must be floating point, got {A.dtype} and {B.dtype}")
    if B.shape[1] != A.shape[0] or A.shape[0] == 0:
        raise bad(f"rank mismatch: A is {tuple(A.shape)}, B is {tuple(B.shape)}")
    if A.shape[1] == 0 or B.shape[0] == 0:
        raise bad(f"has an empty dimension: A {tuple(A.shape)}, B {tuple(B.shape)}")
    if not math.isfinite(float(scale)):
        raise bad(f"scale {scale} is not finite")
