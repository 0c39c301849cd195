"""One LoRA adapter on disk: its config, its module table, and lazy factor loading.

``Adapter.open`` reads only the config and the safetensors header. It checks
everything the header can tell (pairs of A and B, ranks, shapes, dtypes) and
lists what clair does not analyse (DoRA magnitudes, LoRA biases, full-weight
copies from ``modules_to_save``) as notes, never silently. ``load`` then reads
one module at a time, so memory is bounded by a module's factors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from clair_cli.constants import (
    CONFIG_NAME,
    DORA_MAGNITUDE_RE,
    FLOAT_DTYPES,
    LORA_KEY_RE,
    PEFT_KEY_PREFIX,
)
from clair_cli.errors import AdapterFormatError
from clair_cli.io.files import open_regular
from clair_cli.io.lora_config import (
    LOFTQ_UNLINEAR,
    base_rewriting_init,
    base_rewriting_note,
    default_targets_note,
    ignored_note,
    loftq_unlinear,
    megatron_note,
    parameter_collisions,
    peft_selects,
    random_init,
    unloadable_init,
    variants_on,
)
from clair_cli.io.paths import printable
from clair_cli.io.peft_config import PEFT_DEFAULT_ALPHA, PEFT_DEFAULT_R
from clair_cli.io.safetensors_file import FileStamp, SafetensorsReader, TensorInfo, changed, file_stamp, read_header
from clair_cli.types import AdapterConfig, AdapterRef, LoraModule, ModuleKind, attention_layers

if TYPE_CHECKING:
    import torch

# Bound on |scale * B @ A| entries (about 1e12): squared in Gram matrices it stays far inside float32.
MAX_UPDATE_ENTRY = 1e12
TORCH_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class ModuleSpec:
    """A LoRA module as the header describes it: keys and shapes, no data."""

    name: str
    kind: ModuleKind
    a_key: str
    b_key: str
    rank: int
    d_in: int
    d_out: int
    scale: float
    dtype: str
    weight_shape: tuple[int, ...] | None = None
    # A and B stored transposed (MLX-LM's lora_a, in x r, and lora_b, r x out: clair_cli.io.mlx).
    transposed: bool = False
    # A's and B's header entries when the adapter was opened: a reader checks its file still has them.
    tensors: tuple[TensorInfo, ...] = field(default=(), compare=False, repr=False)


# Per-expert MoE LoRA modules (transformers 4 key layout) and MoE routers. transformers 5 fuses the
# experts of these models, and PEFT (0.21) converts such an adapter into a LoRA of the fused
# parameters when it loads it: exactly for plain configs, but ignoring rank_pattern / alpha_pattern
# entries of expert and router modules and doubling the rank and alpha of gate/up pairs (which
# changes an rsLoRA scale by sqrt 2). Under transformers 4 the file loads as clair reads it.
EXPERT_MODULE_RE = re.compile(r"\.experts\.\d+\.(?:w1|w2|w3|gate_proj|up_proj|down_proj)$")
ROUTER_MODULE_RE = re.compile(r"\.(?:block_sparse_moe|mlp)\.gate$")
GATE_UP_RE = re.compile(r"\.experts\.\d+\.(?:w1|w3|gate_proj|up_proj)$")
UNLOADABLE_INIT = "which PEFT refuses as it loads the adapter (an initialization it does not know)"
RANDOM_INIT = "a false init_lora_weights (a module the config targets and the file does not fill gets a random update)"
# PEFT 0.22 refuses lora_bias on its MultiheadAttention LoRA as it builds the layer (ValueError: MultiheadAttention
# does not support lora_bias=True), whether or not the file holds the biases: in its words the bias was not applied
# correctly before (huggingface/peft#3935). Such an adapter loads under no PEFT from 0.22 on.
MHA_LORA_BIAS = "lora_bias with a MultiheadAttention LoRA, which PEFT 0.22 and later refuse as they load the adapter"
# PEFT (0.21 and 0.22) refuses an adapter whose target_parameters names a parameter of a layer its target_modules
# also selects, as it loads it (lora_config.parameter_collisions): the config is well formed, the model decides.
PARAMETER_COLLISION = (
    "target_parameters naming the weight of a module target_modules also selects, which PEFT refuses as it loads "
    "the adapter"
)


def _strip(key: str) -> str:
    return key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class Adapter:
    """A validated adapter whose factors are read on demand.

    Attributes:
        ref: where it comes from.
        config: its LoRA config.
        modules: module specs by module name, sorted by name.
        notes: what clair loads but does not analyse, in words.
        extras: tensors beyond the LoRA factors (DoRA, biases, modules_to_save, trainable
            tokens) by kind; a merge refuses them unless told to drop them.
        file_size: bytes of the weights file.
        n_params: parameters in the weights file (all tensors).
        layout: how the file names its tensors: ``peft``, ``kohya`` or ``diffusers``
            (:mod:`clair_cli.io.diffusion`); outputs keep it.
        file_metadata: the weights file's safetensors metadata (a refined diffusion file keeps it).
    """

    def __init__(
        self,
        ref: AdapterRef,
        config: AdapterConfig,
        modules: dict[str, ModuleSpec],
        notes: list[str],
        file_size: int,
        n_params: int,
    ) -> None:
        self.ref = ref
        self.config = config
        self.modules = modules
        self.notes = notes
        self.file_size = file_size
        self.n_params = n_params
        # The weights file's version when it was opened: every later read is of that version or refused.
        self.stamp: FileStamp | None = None
        # What a merge of LoRA factors cannot carry, by kind: key names (or the config field).
        self.extras: dict[str, list[str]] = {}
        # Modules of a PEFT-layout file whose factors lack PEFT's key prefix (PeftModel.from_pretrained
        # does not load them); a merge refuses them (clair_cli.io.lora_config.refuse_unprefixed).
        self.unprefixed: list[str] = []
        # Modules whose LoRA PEFT ties to an embedding's (ensure_weight_tying) but that differ from it.
        self.untied: list[str] = []
        # Modules whose weight target_parameters names while target_modules selects them (PEFT refuses the adapter).
        self.collisions: list[str] = []
        # What of a per-expert MoE LoRA's scaling PEFT does not apply under transformers 5 (expert_scaling).
        self.expert_scaling: str | None = None
        # A diffusion transformer's PEFT adapter that diffusers' loaders apply at another scale than PEFT
        # (clair_cli.io.diffusion.peft_diffusion_scale).
        self.loader_scale: str | None = None
        self.layout = "peft"
        self.file_metadata: dict[str, str] = {}
        self._weights_sha256: str | None = None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def base_model(self) -> str | None:
        return self.config.base_model

    def file_digests(self) -> dict[str, str]:
        """sha256 of each file read, by file name: the weights and (unless built from flags) the config.

        The config's is taken from the bytes parsed. The weights are hashed once, in one
        sequential pass, when first asked for (after an audit their pages are cached); a file
        whose size changed since its header was read is refused.

        Raises:
            AdapterFormatError: the weights file changed or cannot be read.
        """
        if self._weights_sha256 is None:
            self._weights_sha256 = _sha256_file(self.ref.weights_file, self.file_size, self.stamp)
        out = {self.ref.weights_file.name: self._weights_sha256}
        if self.config.sha256 is not None:  # the file actually read (--config may stand in for one beside the weights)
            out[self.config.file_name or "config"] = self.config.sha256
        return out

    def for_module(self, module: str, absolute: bool = True) -> Adapter:
        """A copy that holds one module (no notes, no extras); ``absolute``: it names its file by
        absolute path, what a worker whose working directory is not the caller's needs to read it
        (a worker of this machine keeps the path as given, so its errors read as the caller's)."""
        out = copy.copy(self)
        out.modules = {module: self.modules[module]}
        out.notes, out.extras = [], {}
        if absolute:
            out.ref = replace(self.ref, weights_file=Path(os.path.abspath(self.ref.weights_file)))
        return out

    def unanalysed(self) -> list[str]:
        """What PEFT applies when it loads this adapter that clair's analysis of ``scale * B @ A``
        does not cover, one phrase a kind (empty for a plain LoRA): the tensors beyond the
        factors (:attr:`extras`), an ``init_lora_weights`` with which PEFT rewrites the base
        weights, and ``init_lora_weights: false``, with which every module the config targets and
        the file does not fill keeps PEFT's random, non-zero initialisation. ``clair gate`` flags
        a candidate that has any (``--allow-unanalysed`` judges its LoRA update alone)."""
        out = [
            f"{kind} {keys[0]}" if keys[0].startswith("(") else f"{kind} ({_plural(len(keys), 'tensor')})"
            for kind, keys in self.extras.items()
        ]
        init = self.config.raw.get("init_lora_weights")
        method = base_rewriting_init(self.config.raw)
        if method is not None and loftq_unlinear(self.config, self.modules):
            out.append(
                f"init_lora_weights {printable(repr(init))} ({LOFTQ_UNLINEAR}: PEFT 0.21.2 fails to load it, and "
                "PEFT 0.22 quantises the base weights of any Linear layer target_modules also selects)"
            )
        elif method is not None:
            out.append(f"init_lora_weights {printable(repr(init))} ({method}: PEFT rewrites the base weights)")
        if random_init(self.config.raw):
            out.append(RANDOM_INIT)
        if unloadable_init(self.config.raw):
            out.append(f"init_lora_weights {printable(repr(init))[:60]}, {UNLOADABLE_INIT}")
        if self.config.lora_bias and self.config.attention_layers and self.layout == "peft":
            out.append(MHA_LORA_BIAS)
        # target_parameters on plain Linear weights is exactly scale * B @ A; the others are not.
        out += [why for why in variants_on(self.config.raw) if not why.startswith("target_parameters")]
        if self.collisions:
            out.append(f"{PARAMETER_COLLISION} ({_listed(self.collisions)})")
        if self.untied:
            out.append(f"ensure_weight_tying with a LoRA unlike its tied embedding's ({_listed(self.untied)})")
        if self.expert_scaling:
            out.append(self.expert_scaling)
        if self.loader_scale:
            out.append(self.loader_scale)
        return out

    @property
    def dtypes(self) -> list[str]:
        return sorted({TORCH_DTYPE_NAMES[m.dtype] for m in self.modules.values()})

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @classmethod
    def open(
        cls,
        ref: AdapterRef,
        config: AdapterConfig,
        max_rank: int | None = None,
        max_modules: int | None = None,
        header: tuple[dict[str, TensorInfo], dict[str, str]] | None = None,
        keys: HeaderKeys | None = None,
        stamp: FileStamp | None = None,
    ) -> Adapter:
        """Read the header of ``ref.weights_file`` (unless given) and build the module table
        (from ``keys`` when given: a diffusion layout's, :mod:`clair_cli.io.diffusion`).
        ``stamp``: the file's :class:`FileStamp` taken before ``header`` was read (taken here
        otherwise); the file must still be that version once the table is built, and every later
        read checks it again.

        Raises:
            AdapterFormatError: unpaired factors, rank or shape mismatches, non-float
                dtypes, rank 0, more modules than ``max_modules``, no LoRA tensor at all, or a
                file that changed since ``stamp``.
        """
        path = ref.weights_file
        if stamp is None:
            if header is not None:
                raise ValueError("a header given without the stamp taken before it was read")
            stamp = file_stamp(path)
        tensors, metadata = header if header is not None else read_header(path)
        keys = keys if keys is not None else classify_keys(path, tensors)
        parts, dora, biases, others = keys.parts, keys.dora, keys.lora_biases, keys.others
        check_module_count(path, len(parts), max_modules)
        layers = attention_layers(parts)
        if layers:
            config = replace(
                config, attention_layers=layers, out_proj_doubled=keys.layout == "peft" and config.out_proj_doubled
            )
            if config.out_proj_doubled is None:
                _refuse_peft_version(path, config, layers)
        params = parameter_names(path, config, parts)
        if params:
            config = replace(config, parameter_names=params)

        modules: dict[str, ModuleSpec] = {}
        for module in sorted(parts):
            modules[module] = _module_spec(path, config, module, parts[module], max_rank)
        if not modules:
            raise AdapterFormatError(
                f"{path}: no LoRA tensors found (expected keys like '<module>.lora_A.weight')",
                hint="Is this a full model checkpoint rather than a LoRA adapter?",
            )

        notes: list[str] = []
        base_biases = keys.base_biases
        if dora or config.use_dora:
            notes.append(
                f"DoRA: magnitude vectors of {_plural(len(dora), 'module')} not analysed; "
                "CLAIR uses the low-rank direction scale*B@A only"
            )
        if biases:
            notes.append(f"LoRA bias in {_plural(len(biases), 'module')} not analysed")
        if base_biases:
            notes.append(
                f"{_plural(len(base_biases), 'bias tensor')} of the base layers (PEFT bias='all' / 'lora_only': "
                f"{_listed(base_biases)}) not analysed"
            )
        if others:
            notes.append(
                f"{_plural(len(others), 'non-LoRA tensor')} (modules_to_save / full weights: {_listed(others)}) "
                "not analysed"
            )
        if keys.embeddings:
            notes.append(
                f"{_plural(len(keys.embeddings), 'bundled embedding tensor')} ({_listed(keys.embeddings)}) not "
                "analysed: A1111 loads them as textual-inversion embeddings beside the LoRA, sd-scripts and ComfyUI "
                "apply the LoRA alone, and diffusers refuses the file"
            )
        defaults = {"r": PEFT_DEFAULT_R, "lora_alpha": PEFT_DEFAULT_ALPHA}
        missing = [f for f in defaults if config.file_name is not None and f not in config.raw and keys.layout != "mlx"]
        if missing:
            notes.append(
                f"its {config.file_name} does not give {' or '.join(missing)}: PEFT loads it with its default "
                f"{' and '.join(f'{f}={defaults[f]}' for f in missing)}, and so does clair"
            )
        if config.trainable_token_indices:
            notes.append("trainable_token_indices (new token embeddings) not analysed")
        if config.out_proj_doubled and layers:
            notes.append(_doubled_note(config, layers))
        if config.lora_bias and layers and keys.layout == "peft":
            notes.append(
                f"lora_bias with the LoRA of {_plural(len(layers), 'MultiheadAttention layer')} "
                f"({_listed(sorted(layers))}): PEFT 0.22 and later refuse to load this adapter (MultiheadAttention "
                "does not support lora_bias=True; huggingface/peft#3935: its bias was not applied correctly before); "
                "clair reads its factors (clair gate flags it)"
            )
        ignored = ignored_note(config, modules)
        if ignored:
            notes.append(ignored)
        defaults_note = default_targets_note(config) if config.file_name is not None and keys.layout == "peft" else None
        if defaults_note:
            notes.append(defaults_note)
        rewriting = base_rewriting_note(config, modules)
        if rewriting:
            notes.append(rewriting)
        megatron = megatron_note(config)
        if megatron:
            notes.append(megatron)
        if unloadable_init(config.raw):
            shown = printable(repr(config.raw["init_lora_weights"]))[:60]
            notes.append(f"init_lora_weights {shown}, {UNLOADABLE_INIT}; clair reads its factors (clair gate flags it)")
        collisions = parameter_collisions(config, modules) if keys.layout == "peft" else []
        if collisions:
            notes.append(
                f"target_parameters names the weight of {_plural(len(collisions), 'module')} its target_modules also "
                f"selects ({_listed(collisions)}): PEFT (0.21 and 0.22) refuses to load this adapter (ValueError: "
                "Trying to wrap an `nn.Parameter` of layer ... which is not a valid target; make sure that this layer "
                "is not also targeted with `target_modules`); clair reads its factors (clair gate flags it)"
            )
        if random_init(config.raw):
            notes.append(
                f"init_lora_weights {printable(repr(config.raw['init_lora_weights']))}: PEFT gives every module its "
                "config targets and this file does not fill a random, non-zero update (clair sees only the modules "
                "the file holds; clair gate flags it)"
            )
        negative = [m for m, spec in modules.items() if spec.scale < 0]
        if negative:
            # PEFT applies a negative lora_alpha / alpha_pattern as given: the update's sign flips
            # there, which the audit judges like any flipped update (rules 12-14 per module).
            notes.append(
                f"negative LoRA scale (lora_alpha / alpha_pattern) on {_plural(len(negative), 'module')} "
                f"({_listed(negative)}): PEFT applies it, so the update there is sign-flipped"
            )
        unprefixed = sorted(keys.unprefixed) if keys.layout == "peft" else []
        if unprefixed:
            notes.append(
                f"{_plural(len(unprefixed), 'module')} stored without PEFT's key prefix {PEFT_KEY_PREFIX!r} "
                f"(e.g. {modules[unprefixed[0]].a_key}): PeftModel.from_pretrained does not load them (their update "
                "there is 0; transformers' load_adapter does load them), clair analyses them as stored"
            )
        untied = _untied(path, config, modules) if keys.layout == "peft" else []
        if untied:
            notes.append(
                f"ensure_weight_tying: {_listed(untied)} holds a LoRA of an embedding's shapes, transposed, that "
                "differs from the embedding's: where the base model ties the two, PEFT gives both the one it "
                "loads last (usually lm_head's), while clair analyses each as stored (clair gate flags it)"
            )
        moe = "; ".join(why for why in (expert_scaling(config, modules), renamed_scaling(config, modules)) if why)
        if moe:
            notes.append(f"{moe} (under transformers 4 it loads as clair reads it; clair gate flags it)")
        loader_scale = None
        if keys.layout == "peft":
            from clair_cli.io.diffusion import peft_diffusion_scale

            loader_scale = peft_diffusion_scale({m: spec.scale for m, spec in modules.items()}, unprefixed)
        if loader_scale:
            notes.append(f"{loader_scale}: clair analyses PEFT's (clair gate flags it)")
        n_conv = sum(m.kind == "conv" for m in modules.values())
        if n_conv:
            notes.append(f"{_plural(n_conv, 'conv module')}: kernels flattened into the input dimension")
        extras = {
            kind: keys
            for kind, keys in (
                ("DoRA magnitude vectors", sorted(dora) or (["(use_dora in the config)"] if config.use_dora else [])),
                ("LoRA biases", sorted(biases)),
                ("base-layer biases", sorted(base_biases)),
                ("modules_to_save / full weights", sorted(others)),
                ("bundled textual-inversion embeddings", sorted(keys.embeddings)),
                (
                    "trainable token embeddings",
                    ["(trainable_token_indices in the config)"] if config.trainable_token_indices else [],
                ),
            )
            if keys
        }
        if file_stamp(path) != stamp:  # rewritten or replaced while its header and tensors above were read
            raise changed(path)
        adapter = cls(
            ref,
            config,
            modules,
            notes,
            file_size=stamp.size,
            n_params=sum(t.numel for t in tensors.values()),
        )
        adapter.stamp = stamp
        adapter.extras = extras
        adapter.untied = untied
        adapter.collisions = collisions
        adapter.expert_scaling = moe
        adapter.loader_scale = loader_scale
        adapter.unprefixed = unprefixed
        adapter.layout = keys.layout
        adapter.file_metadata = dict(metadata)
        return adapter

    def load(
        self,
        names: Iterable[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[LoraModule]:
        """Yield modules' factors one at a time, checked finite.

        Args:
            names: modules to read, in order; all (sorted) when ``None``.
            dtype: cast factors to this dtype (default float32, the precision of decompositions).

        Raises:
            AdapterFormatError: a tensor holds NaN or Inf, or cannot be read.
        """
        wanted = list(self.modules) if names is None else list(names)
        with self.reader() as reader:
            for name in wanted:
                yield self.read_module(reader, name, dtype)

    def reader(self) -> SafetensorsReader:
        """A reader of this adapter's weights file, to use as a context manager.

        Raises:
            AdapterFormatError: the file is not the version opened (rewritten or replaced since:
                its :class:`FileStamp` or, on another machine, its modules' header entries differ).
        """
        path = self.ref.weights_file
        reader = SafetensorsReader(path, self.stamp)
        if self.stamp is None or not self.stamp.here():
            for spec in self.modules.values():
                if any(reader.tensors.get(info.name) != info for info in spec.tensors):
                    raise changed(path)
        return reader

    def read_module(self, reader: SafetensorsReader, name: str, dtype: torch.dtype | None = None) -> LoraModule:
        """One module's factors through an open :meth:`reader`, checked finite.

        Raises:
            AdapterFormatError: a tensor holds NaN or Inf, or cannot be read.
        """
        import torch

        spec = self.modules[name]
        factors = reader.get_many([spec.a_key, spec.b_key])
        # One reduction per factor checks both things: max |x| is NaN or Inf exactly when a
        # value is (torch's max propagates NaN), and it bounds the update below.
        peaks = [peak(f) for f in factors]
        self._check_peaks(spec, peaks)
        for j, key in subnormal_suspects(spec, peaks):
            self._check_subnormal(spec, [(key, factors[j])])
        dtype = dtype or torch.float32
        if spec.transposed:
            factors = [factors[0].T, factors[1].T]
        return LoraModule(
            name=name,
            A=factors[0].reshape(spec.rank, spec.d_in).to(dtype),
            B=factors[1].reshape(spec.d_out, spec.rank).to(dtype),
            scale=spec.scale,
            kind=spec.kind,
            fan_in_fan_out=self.config.fan_in_fan_out and spec.kind == "linear",
            weight_shape=spec.weight_shape,
        )

    def _check_peaks(self, spec: ModuleSpec, peaks: list[float]) -> None:
        """Refuse a module whose factors hold NaN/Inf, or whose update ``scale * B @ A`` can overflow,
        from the largest |value| of each factor."""
        shown = printable(str(self.ref.weights_file))
        for key, top in zip((spec.a_key, spec.b_key), peaks, strict=True):
            if not math.isfinite(top):
                raise AdapterFormatError(
                    f"{shown}: tensor {key!r} contains NaN or Inf values",
                    hint="The adapter diverged during training or the file is corrupt.",
                )
        if update_overflows(spec.scale, spec.rank, peaks):
            raise AdapterFormatError(
                f"{shown}: module {spec.name!r}: factor values (up to {max(peaks):.3g}, scale {spec.scale:.3g}) "
                "make its update overflow",
                hint="The adapter diverged during training or the file is corrupt.",
            )

    def _check_subnormal(self, spec: ModuleSpec, pieces: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Refuse a factor holding values below float32's normal range (:func:`has_subnormal`)."""
        for key, piece in pieces:
            if has_subnormal(piece):
                raise AdapterFormatError(
                    f"{printable(str(self.ref.weights_file))}: tensor {key!r} of module {spec.name!r} holds "
                    "subnormal values (nonzero, below 1.2e-38), which clair's arithmetic reads as zero "
                    "but a loader multiplies into the update",
                    hint="No trained adapter holds such values: the file is corrupt or crafted.",
                )

    def scan_module(self, reader: SafetensorsReader, name: str) -> bool:
        """Check one module as :meth:`read_module` does, reading each factor in bounded chunks
        (never a whole factor at once: a header may claim gigabytes). Returns whether its update
        is zero (a factor with only zeros).

        Raises:
            AdapterFormatError: a tensor holds NaN or Inf, or cannot be read.
        """
        spec = self.modules[name]
        peaks = [max((peak(chunk) for chunk in reader.chunks(key)), default=0.0) for key in (spec.a_key, spec.b_key)]
        self._check_peaks(spec, peaks)
        for _, key in subnormal_suspects(spec, peaks):
            self._check_subnormal(spec, ((key, chunk) for chunk in reader.chunks(key)))
        return min(peaks) == 0.0


def check_module_count(path: Path, n: int, max_modules: int | None) -> None:
    """Refuse an adapter of more than ``max_modules`` LoRA modules (``--max-modules``), before any tensor is read.

    Raises:
        AdapterFormatError: naming the file and both numbers.
    """
    if max_modules is not None and n > max_modules:
        raise AdapterFormatError(
            f"{printable(str(path))}: {n} LoRA modules, more than --max-modules {max_modules}; "
            "refused before reading any factor",
            hint="The audit costs tens of milliseconds per module (docs: Limits); raise --max-modules "
            "if the adapter is trusted and the machine has the time.",
        )


def update_overflows(scale: float, rank: int, peaks: Sequence[float]) -> bool:
    """Whether an update ``scale * B @ A`` of rank ``rank`` whose factors' largest ``|entries|``
    are ``peaks`` can pass ``MAX_UPDATE_ENTRY``: past that the analysis (Gram matrices, in
    float32) would overflow to Inf before any decomposition, and the update is refused, named."""
    bound = abs(scale) * rank * math.prod(peaks)
    return not math.isfinite(bound) or bound > MAX_UPDATE_ENTRY


FLOAT32_TINY = 1.1754943508222875e-38  # float32's (and bfloat16's) smallest normal number
SUBNORMAL_NEGLIGIBLE = 2.0**-64  # what subnormal values may add to an update's entry unread (5e-20)


def subnormal_suspects(spec: ModuleSpec, peaks: Sequence[float]) -> list[tuple[int, str]]:
    """The factors of a module (index, key) whose subnormal values, read as zero under the
    commands' flush (:func:`has_subnormal`), could hide more than ``SUBNORMAL_NEGLIGIBLE`` in an
    entry of the update: ``rank * |scale| * 1.2e-38 * `` the other factor's largest ``|value|``.
    Only those are read bit by bit: a trained adapter's factors (values near 1, scales near 1)
    hide at most about 1e-36 that way, and the bit test costs as much as reading the file, while a
    factor of subnormal values beside one near 1e38 (a payload PEFT applies in full) is found."""
    keys = (spec.a_key, spec.b_key)
    reach = [spec.rank * abs(spec.scale) * FLOAT32_TINY * other for other in reversed(peaks)]
    return [(j, keys[j]) for j in range(2) if not reach[j] <= SUBNORMAL_NEGLIGIBLE]


# The bits of float32 and bfloat16 values: (integer view, exponent mask, mantissa mask).
_FLOAT_BITS = {"float32": ("int32", 0x7F800000, 0x007FFFFF), "bfloat16": ("int16", 0x7F80, 0x007F)}


def has_subnormal(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a subnormal float32 or bfloat16 value (nonzero, below 1.2e-38). The
    commands flush such values to zero (:func:`clair_cli.cli.threads.flush_denormals`),
    conversions included, while a loader that does not (PEFT on a CPU) multiplies them by factors
    up to 3e38 into an ordinary update: a module whose ``A`` is subnormal and whose ``B`` is huge
    would be audited as zero. Read from the bits, which the flush does not touch. A float64 value
    that small is a normal float64: clair's canonical factors take it exactly (a re-factored
    update, ``(B / 1e39, A 1e39)``, is audited as the same update), and a float64 file whose
    values float32 cannot hold is refused where PEFT would load it into float32."""
    import torch

    name = str(t.dtype).removeprefix("torch.")
    if name in _FLOAT_BITS:
        view, exponent, mantissa = _FLOAT_BITS[name]
        bits = t.reshape(-1).view(getattr(torch, view))
        return bool(((bits & exponent) == 0).logical_and_((bits & mantissa) != 0).any())
    return False  # float16 and float8 values are normal numbers in float32, float64 ones in float64


def peak(t: torch.Tensor) -> float:
    """max |t| (NaN if t holds a NaN), 0 for an empty tensor."""
    return float(t.abs().max()) if t.numel() else 0.0


def _listed(keys: list[str], n: int = 3) -> str:
    return ", ".join(sorted(keys)[:n]) + (", ..." if len(keys) > n else "")


def _said_version(config: AdapterConfig) -> str:
    if "peft_version" not in config.raw:
        return "no peft_version (saved before PEFT 0.18)"
    return f"peft_version {printable(json.dumps(config.raw['peft_version'], default=str))[:80]}"


def _refuse_peft_version(path: Path, config: AdapterConfig, layers: Iterable[str]) -> None:
    """Refuse an adapter with a MultiheadAttention out_proj LoRA whose config's ``peft_version`` is no
    version: PEFT 0.22 parses it to decide whether to double that LoRA, and fails."""
    name = config.file_name or CONFIG_NAME
    raise AdapterFormatError(
        f"{printable(str(path))}: its {name} has {_said_version(config)}, which is not a version: PEFT (0.22 and "
        f"later) reads it to load the out_proj LoRA of MultiheadAttention {printable(sorted(layers)[0])} and fails",
        hint='Give the version of PEFT that saved the adapter ("peft_version": "0.21.0" for one trained before '
        "PEFT 0.22, whose out_proj LoRA it applied twice), or re-save the adapter with PEFT.",
    )


def _doubled_note(config: AdapterConfig, layers: Collection[str]) -> str:
    return (
        f"{_said_version(config)}: the out_proj LoRA of its {_plural(len(layers), 'MultiheadAttention layer')} "
        f"({_listed(sorted(layers))}) is read at twice scale*B@A, as PEFT before 0.22 applied it (twice, "
        "huggingface/peft#3774) and PEFT 0.22 and later loads it (doubling lora_B)"
    )


@dataclass
class HeaderKeys:
    """A header's tensor names sorted by what they are.

    Attributes:
        parts: LoRA factors by module, then by part (``lora_A``, ``lora_B``, ``lora_embedding_A``...).
        dora: DoRA magnitude vectors.
        lora_biases: LoRA biases (``lora_B.bias``, PEFT ``lora_bias=True``).
        base_biases: biases of the base layers (PEFT ``bias='all'`` / ``'lora_only'``).
        others: every other tensor (``modules_to_save`` copies, full weights).
        embeddings: textual-inversion embeddings bundled in a kohya file (``bundle_emb.<name>.<vector>``).
        layout: the file's key layout (``peft``, ``kohya``, ``diffusers``).
        unprefixed: modules in ``parts`` whose factor keys lack PEFT's key prefix (``base_model.model.``),
            which PeftModel.from_pretrained does not load (meaningful in the ``peft`` layout only).
    """

    parts: dict[str, dict[str, TensorInfo]]
    dora: list[str]
    lora_biases: list[str]
    base_biases: list[str]
    others: list[str]
    layout: str = "peft"
    embeddings: list[str] = field(default_factory=list)
    unprefixed: set[str] = field(default_factory=set)


def classify_keys(path: Path, tensors: dict[str, TensorInfo]) -> HeaderKeys:
    """Sort a header's tensors into LoRA factors by module and the rest, by key name alone.

    Raises:
        AdapterFormatError: a key prefixed twice, or two tensors for one factor of one module.
    """
    shown = printable(str(path))
    keys = HeaderKeys({}, [], [], [], [])
    prefixed: dict[str, dict[bool, str]] = {}  # per module, a key of each spelling: with PEFT's prefix or without
    for key, info in tensors.items():
        short = _strip(key)
        if short.startswith(PEFT_KEY_PREFIX):
            raise AdapterFormatError(
                f"{shown}: key {key!r} carries the prefix {PEFT_KEY_PREFIX!r} twice; PEFT cannot load it",
                hint="Re-save the adapter with PEFT's save_pretrained(), or strip the repeated prefix.",
            )
        m = LORA_KEY_RE.match(short)
        if m and m["adapter"] not in (None, "default"):
            # PeftModel.from_pretrained loads the keys save_pretrained writes (no adapter name; also
            # ".default.") and leaves the rest out: its module keeps PEFT's initialisation (zero, or a
            # factor of the attacker's choosing beside a random other one), not what clair would read.
            raise AdapterFormatError(
                f"{shown}: key {key!r} carries the adapter name {printable(m['adapter'])!r}; PEFT's save_pretrained "
                "writes none, and PeftModel.from_pretrained does not load such a key",
                hint="Re-save the adapter with PEFT's save_pretrained(), or strip the adapter name from its keys.",
            )
        if m and m["suffix"] == ".bias":
            keys.lora_biases.append(short)
        elif m and (m["part"].startswith("lora_embedding") == (m["suffix"] is None)):
            have = keys.parts.setdefault(m["module"], {})
            if m["part"] in have:
                raise AdapterFormatError(
                    f"{shown}: module {m['module']!r} has two {m['part']} tensors, "
                    f"{have[m['part']].name!r} and {key!r} (two key spellings or two adapter names)",
                    hint="Keep one adapter per file, with PEFT's key names.",
                )
            have[m["part"]] = info
            prefixed.setdefault(m["module"], {})[key.startswith(PEFT_KEY_PREFIX)] = key
            if not key.startswith(PEFT_KEY_PREFIX):
                keys.unprefixed.add(m["module"])
        elif DORA_MAGNITUDE_RE.match(short):
            keys.dora.append(short)
        elif short.endswith(".bias") and "lora_" not in short:
            keys.base_biases.append(short)
        else:
            keys.others.append(short)
    mixed = next((spelt for spelt in prefixed.values() if len(spelt) == 2), None)
    if mixed is not None:
        # PEFT loads the prefixed factor and keeps its own initialisation for the other (a random
        # lora_A): its update is neither the pair clair would read nor zero.
        raise AdapterFormatError(
            f"{shown}: one module's factors are stored with and without PEFT's key prefix {PEFT_KEY_PREFIX!r} "
            f"({mixed[True]!r} and {mixed[False]!r}); PeftModel.from_pretrained loads only the first, beside its own "
            "initialisation of the other",
            hint="Re-save the adapter with PEFT's save_pretrained(), which prefixes every key.",
        )
    return keys


def parameter_names(path: Path, config: AdapterConfig, modules: Iterable[str]) -> dict[str, str]:
    """For a config with ``target_parameters`` and rank or alpha patterns: the name PEFT matches those
    patterns against for each module that holds a parameter's LoRA, ``<module>.<parameter>`` (PEFT's
    ``_inject_parameters`` passes that as the key; the file's keys carry the module's name only).

    Raises:
        AdapterFormatError: a module whose LoRA is of one of several parameters of one layer (PEFT nests
            their wrappers: ``<module>.base_layer``), where which parameter's name the patterns meet
            cannot be told from the file.
    """
    targets = config.raw.get("target_parameters")
    if not (config.rank_pattern or config.alpha_pattern) or not isinstance(targets, list):
        return {}
    entries = [t for t in targets if isinstance(t, str) and "." in t]
    out: dict[str, str] = {}
    for module in modules:
        if peft_selects(config.raw, module) is True:  # a module's LoRA (target_modules)
            continue
        owner = module.replace(".base_layer", "")  # PEFT's strip_base_layer_from_name
        names = {
            f"{module}.{param}"
            for entry in entries
            for param in [entry.rpartition(".")[2]]
            if f"{owner}.{param}" == entry or f"{owner}.{param}".endswith("." + entry)
        }
        if not names:
            continue
        if owner != module:  # nested wrappers: the name may be spelt with or without base_layer
            names |= {n.replace(".base_layer", "") for n in names}
        if (len(names) > 1 or owner != module) and not _same_scale(config, module, names):
            raise AdapterFormatError(
                f"{printable(str(path))}: module {module!r} holds the LoRA of one of several target_parameters of one "
                f"layer ({', '.join(sorted(n.rpartition('.')[2] for n in names))}), and PEFT matches rank_pattern / "
                "alpha_pattern keys against the parameter's name, which the file does not tell; clair does not read it",
                hint="Leave this adapter out, or give every parameter the same r and lora_alpha (no patterns).",
            )
        out[module] = min(names)
    return out


def _same_scale(config: AdapterConfig, module: str, names: set[str]) -> bool:
    """Whether the rank and alpha patterns give ``module`` one rank and one alpha whichever of
    ``names`` PEFT matches them against (then which one it is does not matter)."""
    found = {
        (probe.rank_for(module), probe.alpha_for(module))
        for probe in (replace(config, parameter_names={module: name}) for name in names)
    }
    return len(found) == 1


def expert_scaling(config: AdapterConfig, modules: Iterable[str]) -> str | None:
    """What of a per-expert MoE LoRA's scaling PEFT does not apply when transformers 5 fuses the
    experts (see ``EXPERT_MODULE_RE``): rank or alpha patterns that change an expert's or a router's
    scale, or rsLoRA on gate/up experts. None for other adapters."""
    modules = list(modules)
    experts = [m for m in modules if EXPERT_MODULE_RE.search(m)]
    if not experts:
        return None
    routed = experts + [m for m in modules if ROUTER_MODULE_RE.search(m)]
    patterned = [m for m in routed if config.rank_for(m) != config.r or config.alpha_for(m) != config.lora_alpha]
    if patterned:
        return (
            f"rank_pattern / alpha_pattern on {_plural(len(patterned), 'expert or router module')} of a per-expert "
            f"MoE LoRA (e.g. {patterned[0]}): PEFT ignores them where transformers 5 fuses the experts"
        )
    if config.use_rslora and any(GATE_UP_RE.search(m) for m in experts):
        return (
            "rsLoRA on the gate/up experts of a per-expert MoE LoRA: where transformers 5 fuses the experts, "
            "PEFT scales their updates by sqrt 2"
        )
    return None


# The top-level modules of a vision-language model's LoRA saved under transformers 4 (llava, llava_next, gemma3,
# paligemma, mistral3, internvl, aya_vision, got_ocr2, fuyu, ...), and their names under transformers 5, which
# renames them as it loads the model; PEFT (0.21, peft.utils.transformers_weight_conversion) renames the adapter's
# keys with it and matches rank_pattern / alpha_pattern keys against the new names. First match wins.
TRANSFORMERS5_RENAMES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("vision_embed_tokens.", "model.vision_embed_tokens."),
)


def transformers5_name(module: str) -> str | None:
    """``module``'s name under transformers 5 where it renames a transformers-4 vision-language layout, or None."""
    for old, new in TRANSFORMERS5_RENAMES:
        if (module + ".").startswith(old):
            return (new + (module + ".")[len(old) :])[:-1]
    return None


def renamed_scaling(config: AdapterConfig, modules: Iterable[str]) -> str | None:
    """What of the patterns' scaling PEFT does not apply where transformers 5 renames the modules of a
    transformers-4 vision-language LoRA (:data:`TRANSFORMERS5_RENAMES`): modules to which rank_pattern /
    alpha_pattern give another rank or alpha under their old name than under the new one. None for others."""
    if not (config.rank_pattern or config.alpha_pattern):
        return None
    changed = []
    for m in modules:
        new = transformers5_name(m)
        if new is not None and (config.rank_for(m), config.alpha_for(m)) != (
            config.rank_for(new),
            config.alpha_for(new),
        ):
            changed.append((m, new))
    if not changed:
        return None
    m, new = changed[0]
    return (
        f"rank_pattern / alpha_pattern give {_plural(len(changed), 'module')} of a transformers-4 vision-language "
        f"layout (e.g. {m}) another rank or alpha than its transformers-5 name ({new}), which PEFT matches them "
        "against where transformers 5 renames the model's modules"
    )


def _untied(path: Path, config: AdapterConfig, modules: dict[str, ModuleSpec]) -> list[str]:
    """With ``ensure_weight_tying``, the linear modules whose factors have an embedding module's
    shapes, transposed (the ``lm_head`` of a tied ``embed_tokens``), and equal none of them. PEFT
    makes such a pair one LoRA on a tied model: the one it loads last (``lm_head``'s) for both;
    ``save_pretrained`` writes ``lora_A = B_emb^T`` and ``lora_B = A_emb^T``. Reads those tensors."""
    if config.raw.get("ensure_weight_tying") is not True:
        return []
    embeddings = [s for s in modules.values() if s.kind == "embedding"]
    if not embeddings:
        return []
    out = []
    with SafetensorsReader(path) as reader:
        shapes = {s.name: (reader.tensors[s.a_key].shape, reader.tensors[s.b_key].shape) for s in modules.values()}
        for spec in modules.values():
            a_shape, b_shape = shapes[spec.name]
            tied = [e for e in embeddings if shapes[e.name] == (b_shape[::-1], a_shape[::-1])]
            if spec.kind != "linear" or not tied:
                continue
            a, b = reader.get_many([spec.a_key, spec.b_key])
            if not any(_transposed_pair(reader, e, a, b) for e in tied):
                out.append(spec.name)
    return sorted(out)


def _transposed_pair(reader: SafetensorsReader, embedding: ModuleSpec, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``(a, b)`` are the embedding's factors transposed, exactly (as save_pretrained writes them)."""
    import torch

    emb_a, emb_b = reader.get_many([embedding.a_key, embedding.b_key])
    return bool(torch.equal(a, emb_b.T.to(a.dtype)) and torch.equal(b, emb_a.T.to(b.dtype)))


def _sha256_file(path: Path, size: int, stamp: FileStamp | None = None) -> str:
    """The file's sha256, refused unless it is the version opened (``stamp``), before and after hashing."""
    digest = hashlib.sha256()
    fd = open_regular(path)
    try:
        if stamp is not None and not stamp.same(os.fstat(fd)):
            raise changed(path)
        if os.fstat(fd).st_size != size:
            raise AdapterFormatError(f"{printable(str(path))}: changed size while being read")
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        if stamp is not None and not stamp.same(os.fstat(fd)):
            raise changed(path)
    except OSError as exc:
        raise AdapterFormatError(f"{printable(str(path))}: cannot be read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    return digest.hexdigest()


def _module_spec(
    path: object, config: AdapterConfig, module: str, parts: dict[str, TensorInfo], max_rank: int | None = None
) -> ModuleSpec:
    def bad(problem: str, hint: str | None = None) -> AdapterFormatError:
        return AdapterFormatError(f"{printable(str(path))}: module {module!r}: {problem}", hint=hint)

    emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    if emb and ("lora_A" in parts or "lora_B" in parts):
        raise bad(
            "has both lora_A/lora_B and lora_embedding_A/lora_embedding_B tensors; PEFT gives a module one kind "
            "(embedding layers the second), so one pair would be ignored",
            hint="Keep the pair that matches the layer (lora_embedding_* for an nn.Embedding) and re-save.",
        )
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
    # An MLX-LM file (clair_cli.io.mlx): its own names (lora_a, in x r; lora_b, r x out) in the messages.
    mlx = any(t.name.endswith((".lora_a", ".lora_b")) for t in parts.values())
    if a_name not in parts or b_name not in parts:
        have, lack = (a_name, b_name) if a_name in parts else (b_name, a_name)
        raise bad(f"has {have.lower()} but no {lack.lower()}" if mlx else f"has {have} but no {lack}")
    a, b = parts[a_name], parts[b_name]
    if ".lora_down" in a.name:  # a kohya file: its own names in the messages
        a_name, b_name = "lora_down", "lora_up"
    elif mlx:
        a_name, b_name = "lora_a", "lora_b"
    for t in (a, b):
        if t.dtype not in FLOAT_DTYPES:
            raise bad(
                f"{t.name} has dtype {t.dtype}; LoRA factors must be floating point: float16, bfloat16, float32 "
                "or float64"
            )
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise bad(f"factors must be matrices, got {a_name} {a.shape} and {b_name} {b.shape}")

    kind: ModuleKind = "embedding" if emb else ("conv" if len(a.shape) > 2 else "linear")
    rank = a.shape[0]
    weight_shape = None
    if kind == "conv":
        if len(b.shape) != len(a.shape):
            raise bad(
                f"{a_name} has {len(a.shape)} dimensions and {b_name} {len(b.shape)}: a conv LoRA's are both "
                f"4-D (got {a_name} {a.shape} and {b_name} {b.shape}), a linear one's both 2-D"
            )
        if any(d != 1 for d in b.shape[2:]):
            raise bad(f"conv {b_name} must have a 1x1 kernel, got {b.shape}")
        weight_shape = (b.shape[0], *a.shape[1:])
    elif len(a.shape) != 2 or len(b.shape) != 2:
        raise bad(f"factors must be matrices, got {a_name} {a.shape} and {b_name} {b.shape}")
    if b.shape[1] != rank:
        if kind == "conv" and 0 < b.shape[1] < rank and rank % b.shape[1] == 0:
            raise bad(
                f"a LoRA of a grouped convolution ({b_name} {b.shape} takes {b.shape[1]} of {a_name}'s {rank} "
                f"channels per group, {rank // b.shape[1]} groups): its update is not one B @ A, and PEFT "
                "cannot merge it either; clair does not read it",
                hint="Leave this adapter out.",
            )
        if mlx:
            raise bad(
                f"rank mismatch: lora_a {list(a.shape[::-1])} has rank {rank} but lora_b {list(b.shape[::-1])} "
                f"has rank {b.shape[1]}"
            )
        raise bad(f"rank mismatch: {a_name} has rank {rank} but {b_name} has {b.shape[1]} columns")
    if rank == 0:
        raise bad("has rank 0")
    if max_rank is not None and rank > max_rank:
        raise bad(
            f"rank {rank} exceeds --max-rank {max_rank}; refused before reading its factors",
            hint="Raise --max-rank if the adapter is trusted and the machine has the memory (docs: Limits).",
        )
    expected = config.rank_for(module)
    if rank != expected and config.raw.get("target_parameters") and rank % expected == 0:
        raise bad(
            f"factors of rank {rank} where the config gives r={expected}: a LoRA of target_parameters "
            f"(nn.Parameters such as fused MoE experts; {rank // expected} LoRAs of rank {expected} in one pair of "
            "factors), which clair does not read",
            hint="Leave this adapter out; clair reads LoRAs of modules (target_modules).",
        )
    if rank != expected and mlx:
        raise bad(
            f"factors have rank {rank} but the config gives rank {expected} "
            f"({config.file_name or 'adapter_config.json'}: lora_parameters.rank, one rank for every module); "
            "MLX-LM would refuse to load it"
        )
    if rank != expected:
        given = f"{config.file_name}: " if config.file_name else ""
        raise bad(
            f"factors have rank {rank} but the config gives r={expected} for this module "
            f"({given}r / rank_pattern); PEFT would refuse to load it"
        )
    d_in = math.prod(a.shape[1:])
    if d_in == 0 or b.shape[0] == 0:
        raise bad(f"has an empty dimension: {a_name} {a.shape}, {b_name} {b.shape}")
    return ModuleSpec(
        name=module,
        kind=kind,
        a_key=a.name,
        b_key=b.name,
        rank=rank,
        d_in=d_in,
        d_out=b.shape[0],
        scale=config.scale_for(module, rank),
        dtype=a.dtype,
        weight_shape=weight_shape,
        tensors=(a, b),
    )


def verify(adapter: Adapter) -> list[str]:
    """Read every module once, in bounded chunks: NaN/Inf raise; all-zero updates become a note.

    Memory stays at one chunk (:data:`clair_cli.io.safetensors_file.CHUNK_BYTES`) whatever the
    sizes the header claims.

    Returns:
        Notes on what the data shows (zero updates, typical of an untrained adapter).
    """
    with adapter.reader() as reader:
        if hasattr(reader, "chunks"):
            zero = [name for name in adapter.modules if adapter.scan_module(reader, name)]
            _scan_others(adapter, reader)
        else:  # factors already in memory
            zero = [m.name for m in adapter.load() if not bool(m.A.any()) or not bool(m.B.any())]
    if not zero:
        return []
    if len(zero) == len(adapter.modules):
        return ["every module's update is zero (untrained adapter?)"]
    return [f"{_plural(len(zero), 'module')} with a zero update (e.g. {zero[0]})"]


def _scan_others(adapter: Adapter, reader: SafetensorsReader) -> None:
    """Check the file's tensors that are no module's factors (biases, full weights of
    ``modules_to_save``, alphas, bias and norm differences) for NaN and Inf, in bounded chunks: clair
    does not analyse them, but refine keeps them and a merge may, and no loader should get them so.

    Raises:
        AdapterFormatError: naming the file and the tensor.
    """
    factors = {key for spec in adapter.modules.values() for key in (spec.a_key, spec.b_key)}
    for name, info in reader.tensors.items():
        if name in factors or not info.dtype.startswith(("F", "BF")):
            continue
        if not all(math.isfinite(peak(piece)) for chunk in reader.chunks(name) for piece in _widened(chunk)):
            raise AdapterFormatError(
                f"{printable(str(adapter.ref.weights_file))}: tensor {name!r} contains NaN or Inf values "
                "(clair does not analyse it, but a merge or refine would carry it)",
                hint="The adapter diverged during training or the file is corrupt.",
            )


def _widened(chunk: torch.Tensor, step: int = 1 << 22) -> Iterator[torch.Tensor]:
    """``chunk``, or for float8 (which abs() and max() do not take) float32 copies of it ``step``
    values at a time: a chunk's widening stays a quarter of the chunk's size again."""
    if chunk.element_size() != 1:
        yield chunk
        return
    flat = chunk.reshape(-1)
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step].float()
