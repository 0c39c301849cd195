"""Write PEFT adapter directories atomically.

A merged adapter is a LoRA with scale 1 in every module (a MultiheadAttention's out_proj, which PEFT
applies at twice the scale of a config without peft_version, stores half its B); its config comes from
:mod:`clair_cli.io.lora_config`, the one writer of configs. Tensor names are PEFT's:
``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for
embeddings). A refined adapter keeps its source's config and every tensor of its
file; only the analysed factors change, as the pipeline computed them (this module
does no arithmetic).

:func:`save_adapter` writes into a staging directory of the run's output transaction
(:class:`clair_cli.io.writers.Outputs`), which checks the target and renames it into
place with the run's other outputs, or not at all. Every name written inside it goes
through :func:`clair_cli.io.paths.join_inside`. The umask is honoured.

Diffusion LoRA files (:mod:`clair_cli.io.diffusion`) are written back in their own layout: a
merged or refined kohya, ComfyUI or diffusers adapter is a directory with ``pytorch_lora_weights.safetensors``
(the name diffusers' ``load_lora_weights(DIR)`` looks for) and the model card, and no
``adapter_config.json`` (PEFT would read one as a description of keys it cannot load). An
MLX-LM adapter (:mod:`clair_cli.io.mlx`) is written back as MLX-LM's ``adapters.safetensors``
(factors transposed, every module of a merge at one rank) beside its source's config.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clair_cli.constants import CONFIG_NAME, MODEL_CARD_NAME, PEFT_KEY_PREFIX, SAFETENSORS_WEIGHTS_NAME
from clair_cli.errors import OutputError
from clair_cli.io.adapter import Adapter, ModuleSpec
from clair_cli.io.diffusion import refuse_swapped_output
from clair_cli.io.paths import apply_umask, join_inside, printable, safe_relpath
from clair_cli.io.writers import os_error_text
from clair_cli.types import OUT_PROJ_DOUBLING, attention_out_projs

if TYPE_CHECKING:
    import torch


def save_adapter(  # noqa: PLR0913 - the files of one adapter directory
    root: Path,
    config: dict[str, Any] | None,
    tensors: dict[str, torch.Tensor] | None,
    card: str,
    name: str | None = None,
    *,
    weights_name: str = SAFETENSORS_WEIGHTS_NAME,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and README.md into ``root`` (or ``root/name``).

    ``name`` (an adapter name, from the input) is made a safe relative path and checked
    to stay inside ``root``. Non-finite tensors are refused before anything is written.
    ``tensors`` None: the tensors file is already there (:class:`MergedStream` wrote it).
    A diffusion LoRA has no ``config`` (None: none written), its own ``weights_name`` and the
    safetensors ``metadata`` of its source (``format`` is always ``pt``).

    Returns:
        The directory written.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    bad = [k for k, v in (tensors or {}).items() if not all_finite(v)]
    if bad:
        raise _non_finite(name or str(root), len(bad), bad[0])
    directory = root if name is None else join_inside(root, safe_relpath(name))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tensors is not None:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(directory / weights_name),
                {**(metadata or {}), "format": "pt"},
            )
            apply_umask(directory / weights_name)  # safetensors creates it 0600
        (directory / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{printable(str(directory))}: cannot write ({os_error_text(exc)})") from exc
    except SafetensorError as exc:
        raise OutputError(f"{printable(str(directory))}: cannot write the tensors ({exc})") from exc
    return directory


# Elements upcast at a time to check a tensor whose dtype torch.isfinite does not take (float8).
_FINITE_CHUNK = 1 << 24
# Where an MLX-LM merge stages its modules at their own ranks before they are padded to one (MergedStream).
MLX_UNPADDED_NAME = ".clair-mlx-unpadded.safetensors"


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (a tensor that is not floating point: true). A dtype
    other than float64/32/16 and bfloat16 (the float8 types: torch.isfinite has no kernel for most
    and answers wrongly for float8_e8m0fnu) is checked upcast to float32, which holds its values
    exactly, a chunk at a time; packed float4 holds no value that is not finite."""
    import torch

    if not t.is_floating_point():
        return True
    if t.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        return bool(torch.isfinite(t).all())
    if t.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        return True  # packed e2m1 encodes no NaN or Inf (and torch cannot convert it)
    flat = t.reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + _FINITE_CHUNK].to(torch.float32)).all())
        for i in range(0, flat.numel(), _FINITE_CHUNK)
    )


def _non_finite(what: str, n: int, first: str) -> OutputError:
    return OutputError(
        f"the output for {printable(what)} would hold NaN or Inf values "
        f"({n} tensor(s), e.g. {printable(first)}); nothing was written",
        hint="An input holds extreme values; inspect the adapters (clair inspect).",
    )


class MergedStream:
    """The merged adapter's tensors file in ``root``, written module by module as
    :func:`clair_cli.pipeline.merge` computes them (a :class:`clair_cli.pipeline.MergeSink`), in
    the layout :func:`merged_tensors` gives; :func:`save_adapter` (``tensors=None``) then adds
    the config and the card. Peak memory is one module's factors.

    Args:
        root: the staging directory of ``--out``.
        specs: an input's module table (kind, kernel shape, keys).
        max_rank: per module merged, a rank its merge does not exceed
            (:func:`clair_cli.pipeline.merged_rank_bound`).
        layout: the inputs' layout (``peft``, ``kohya``, ``diffusers``): key names, the file's
            name, and a kohya file's alphas (written last, once every module's rank is known).
        metadata: safetensors metadata of the file besides ``format`` (``pt``): a diffusion merge's
            (:func:`clair_cli.publish.merged_metadata`).
    """

    def __init__(
        self,
        root: Path,
        specs: Mapping[str, ModuleSpec],
        max_rank: Mapping[str, int],
        layout: str = "peft",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        from clair_cli.constants import DIFFUSERS_WEIGHTS_NAME
        from clair_cli.io.safetensors_stream import SafetensorsStream

        self.root = root
        self.specs = specs
        self.layout = layout
        self.metadata = {**(metadata or {}), "format": "pt"}
        largest: dict[str, tuple[int, ...]] = {}
        for name, rank in max_rank.items():
            a_key, b_key = _layout_keys(specs[name], layout)
            # MLX-LM's modules go to a staging file as merged (r x d_in, d_out x r at their own rank) first
            largest[a_key], largest[b_key] = (rank, specs[name].d_in), (specs[name].d_out, rank)
            if layout != "mlx":
                largest[a_key], largest[b_key] = _shapes(specs[name], rank)
        optional = {f"{name}.alpha": () for name in max_rank} if layout == "kohya" else {}
        self._b_keys: list[str] = []
        self._ranks: dict[str, int] = {}
        self._halved = _halved(max_rank, layout)
        file = root / {"peft": SAFETENSORS_WEIGHTS_NAME, "mlx": MLX_UNPADDED_NAME}.get(layout, DIFFUSERS_WEIGHTS_NAME)
        self._stream = SafetensorsStream(file, largest, self.metadata, optional)

    def __enter__(self) -> MergedStream:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._stream.__enter__()
        except OSError as exc:
            raise self._cannot(exc) from exc
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                for key, alpha in _kohya_alphas(self.layout, self._ranks).items():
                    self._stream.add(key, alpha)
            self._stream.__exit__(exc_type, exc, tb)
            if exc_type is None and self.layout == "mlx":
                self._pad_mlx()
        except OSError as exc:
            raise self._cannot(exc) from exc

    def _pad_mlx(self) -> None:
        """Copy the staged modules into MLX-LM's ``adapters.safetensors``, each padded with zero directions
        to the largest merged rank (MLX-LM gives every module one rank: the same update), one module in
        memory at a time, then remove the staging file."""
        from safetensors import safe_open

        from clair_cli.constants import MLX_WEIGHTS_NAME
        from clair_cli.io.safetensors_stream import SafetensorsStream

        staged = self._stream.path
        rank = max(self._ranks.values(), default=0)
        keys = {name: _layout_keys(self.specs[name], self.layout) for name in self._ranks}
        largest: dict[str, tuple[int, ...]] = {}
        for name, (a_key, b_key) in keys.items():
            largest[a_key], largest[b_key] = _shapes(self.specs[name], rank)
        with (
            safe_open(str(staged), framework="pt") as f,
            SafetensorsStream(self.root / MLX_WEIGHTS_NAME, largest, self.metadata) as out,
        ):
            for name, (a_key, b_key) in sorted(keys.items()):
                A, B = _padded(f.get_tensor(a_key), f.get_tensor(b_key), rank)
                stored_a, stored_b = _stored(self.specs[name], A, B)
                out.add(a_key, stored_a)
                out.add(b_key, stored_b)
        staged.unlink()

    def _cannot(self, exc: OSError) -> OutputError:
        return OutputError(f"{printable(str(self.root))}: cannot write ({os_error_text(exc)})")

    def put(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Append module ``name``'s merged factors (refused, before any byte of theirs, if not finite)."""

        if self.layout == "comfyui":
            refuse_swapped_output(self.specs, name, int(A.shape[0]))
        a_key, b_key = _layout_keys(self.specs[name], self.layout)
        for key, t in ((a_key, A), (b_key, B)):
            if not all_finite(t):
                raise _non_finite(str(self.root), 1, key)
        if name in self._halved:
            B = B / OUT_PROJ_DOUBLING
        # MLX-LM's: staged as merged, stored (and padded) at the end (_pad_mlx)
        stored_a, stored_b = (A, B) if self.layout == "mlx" else _stored(self.specs[name], A, B)
        try:
            self._stream.add(a_key, stored_a)
            self._stream.add(b_key, stored_b)
        except OSError as exc:
            raise self._cannot(exc) from exc
        self._b_keys.append(b_key)
        self._ranks[name] = int(A.shape[0])

    def rewrite_b(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every ``B`` written by ``fn(B)``, in place in the file (``--rescale norm``);
        a result that is not finite is refused."""

        def checked(B: torch.Tensor) -> torch.Tensor:
            out = fn(B)
            if not all_finite(out):
                raise _non_finite(str(self.root), 1, "a rescaled lora_B")
            return out

        try:
            self._stream.rewrite(self._b_keys, checked)
        except OSError as exc:
            raise self._cannot(exc) from exc


def _shapes(spec: ModuleSpec, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The stored shapes of A and B at a new rank: PEFT's (conv kernels keep their layout), or
    MLX-LM's transposed ones (``lora_a`` ``d_in x r``, ``lora_b`` ``r x d_out``)."""
    if spec.transposed:
        return (spec.d_in, rank), (rank, spec.d_out)
    if spec.kind == "conv" and spec.weight_shape is not None:
        return (rank, *spec.weight_shape[1:]), (spec.d_out, rank, *([1] * (len(spec.weight_shape) - 2)))
    return (rank, spec.d_in), (spec.d_out, rank)


def _stored(spec: ModuleSpec, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (``r x d_in``) and ``B`` (``d_out x r``) as the file stores them (:func:`_shapes`)."""
    if spec.transposed:
        return A.T.contiguous(), B.T.contiguous()
    a_shape, b_shape = _shapes(spec, A.shape[0])
    return A.reshape(a_shape), B.reshape(b_shape)


def uniform_rank(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every module's factors at the largest rank among them, the new directions zero (the same
    update): an MLX-LM adapter has one rank for every module (``lora_parameters.rank``)."""

    rank = max((int(A.shape[0]) for A, _B in factors.values()), default=0)
    return {name: _padded(A, B, rank) for name, (A, B) in factors.items()}


def _padded(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (``r x d_in``) and ``B`` (``d_out x r``) at ``rank`` >= ``r``, the new directions zero."""
    import torch

    pad = rank - int(A.shape[0])
    if not pad:
        return A, B
    return torch.cat([A, A.new_zeros(pad, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)


def _keys(spec: ModuleSpec) -> tuple[str, str]:
    if spec.kind == "embedding":
        return f"{PEFT_KEY_PREFIX}{spec.name}.lora_embedding_A", f"{PEFT_KEY_PREFIX}{spec.name}.lora_embedding_B"
    return f"{PEFT_KEY_PREFIX}{spec.name}.lora_A.weight", f"{PEFT_KEY_PREFIX}{spec.name}.lora_B.weight"


def merged_tensors(
    specs: Mapping[str, ModuleSpec], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], layout: str = "peft"
) -> dict[str, torch.Tensor]:
    """Tensors of a merged adapter from per-module ``(A, B)`` (scale 1), laid out as ``specs``
    (an input's module table: kind, kernel shape and, for a diffusion ``layout``, its keys).

    PEFT's keys for ``peft``; the input's own keys for ``kohya`` and ``diffusers``. A merged
    kohya file has scale 1 in every module (:func:`_kohya_alphas`)."""

    out = {}
    if layout == "mlx":
        factors = uniform_rank(factors)
    halved = _halved(factors, layout)
    for name, (A, B) in sorted(factors.items()):
        spec = specs[name]
        if layout == "comfyui":
            refuse_swapped_output(specs, name, int(A.shape[0]))
        if name in halved:
            B = B / OUT_PROJ_DOUBLING
        a_key, b_key = _layout_keys(spec, layout)
        out[a_key], out[b_key] = _stored(spec, A, B)
    out.update(_kohya_alphas(layout, {name: A.shape[0] for name, (A, _B) in factors.items()}))
    return out


def _halved(modules: Iterable[str], layout: str) -> frozenset[str]:
    """The merged modules whose ``B`` a PEFT adapter stores at half the merged update's: a MultiheadAttention's
    out_proj, which PEFT applies at twice the scale of the config clair writes
    (:func:`clair_cli.io.lora_config.lora_config`, :data:`clair_cli.types.OUT_PROJ_DOUBLING`)."""
    return attention_out_projs(modules) if layout == "peft" else frozenset()


def _layout_keys(spec: ModuleSpec, layout: str) -> tuple[str, str]:
    """A merged module's tensor names: PEFT's for ``peft``, the input's own for a diffusion layout."""
    return _keys(spec) if layout == "peft" else (spec.a_key, spec.b_key)


def _kohya_alphas(layout: str, ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The ``alpha`` tensors of a merged kohya file (:func:`merged_tensors`), scale 1 in every module:
    ``alpha`` = rank in each module when all have one rank, or when the file is in diffusers' Flux names
    (``lora_transformer_``: diffusers' Flux loader, ``_convert_mixture_state_dict_to_diffusers``, reads
    such a file only with an alpha in every module); none when ranks differ in another file (no alpha
    means alpha = rank to sd-scripts, A1111, ComfyUI, diffusers' Flux loader of sd-scripts names and its
    Stable Diffusion / SDXL loader, whereas the latter (0.42) scales attention modules whose kohya alpha
    differs from the file's most common one by that common alpha, ``get_peft_kwargs``'s alpha_pattern
    keys not matching them)."""
    import torch

    if layout != "kohya" or not ranks:
        return {}
    if len(set(ranks.values())) != 1 and not any(name.startswith("lora_transformer_") for name in ranks):
        return {}
    return {f"{name}.alpha": torch.tensor(float(rank), dtype=torch.float32) for name, rank in ranks.items()}


def refined_tensors(
    adapter: Adapter, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """All tensors of ``adapter``'s file (original names and dtypes), with the factors of each
    module in ``factors`` (``A`` ``r x d_in``, ``B`` ``d_out x r``, computed by the pipeline) in
    place of its own."""
    with adapter.reader() as reader:
        tensors = {key: reader.get(key) for key in reader.tensors}
    for name, (A, B) in factors.items():
        spec = adapter.modules[name]
        stored_a, stored_b = _stored(spec, A, B)
        tensors[spec.a_key] = stored_a.reshape(tensors[spec.a_key].shape).to(tensors[spec.a_key].dtype)
        tensors[spec.b_key] = stored_b.reshape(tensors[spec.b_key].shape).to(tensors[spec.b_key].dtype)
    return tensors


def source_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter's own config as written to disk, or (a bare file and flags) one built by
    :func:`clair_cli.io.lora_config.lora_config` that gives every module its rank and alpha."""
    from clair_cli.io.lora_config import lora_config, plan_own

    if adapter.config.raw:
        return dict(adapter.config.raw)
    cfg = adapter.config
    modules = {m: (spec.rank, cfg.alpha_for(m)) for m, spec in adapter.modules.items()}
    return lora_config(plan_own(adapter), modules, cfg.use_rslora)
