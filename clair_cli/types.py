"""Small dataclasses shared by the layers: where an adapter comes from, what its
config says (with PEFT's rule for matching its rank and alpha patterns), and one module's
LoRA factors. The run's parameters are in :mod:`clair_cli.params`, the command line's
choices in :mod:`clair_cli.cli.choices`.

Heavy libraries are imported lazily so that ``clair --help`` stays instant.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

ModuleKind = Literal["linear", "embedding", "conv"]


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
        note: what a report says of how the files were found (a hub source read from the cache because the
            Hub did not answer), if anything.
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
    note: str | None = None


# A pattern whose only metacharacter is "." (the usual "layers.0.q_proj"): matched without
# the regex engine, with exactly PEFT's meaning ("." is any character).
PLAIN_PATTERN = re.compile(r"^[A-Za-z0-9_\-.]+$")
# How PEFT (peft.utils.other.get_pattern_key) matches a rank_pattern / alpha_pattern key, and clair
# with it: a key must compile inside this expression (clair_cli.io.peft_config checks it).
PATTERN_KEY_WRAP = r"(.*\.)?({key})$"


def _plain_match(key: str, module: str) -> bool:
    r"""PEFT's ``re.match(rf"(.*\.)?({key})$", module)`` for a key of fixed length L: the key
    matches the module's last L characters, and what precedes them is empty or ends with "."."""
    n = len(key)
    if len(module) < n or (len(module) > n and module[-n - 1] != "."):
        return False
    return all(k == "." or k == c for k, c in zip(key, module[-n:], strict=True))


# PEFT's LoRA layer for nn.MultiheadAttention (``peft.tuners.lora.layer.MultiheadAttention``) also
# wraps the attention's ``out_proj``, whose factors are stored under ``<mha>.base_layer.out_proj``,
# with the rank and alpha of the attention layer itself: patterns and target_modules select ``<mha>``.
MHA_OUT_PROJ = ".base_layer.out_proj"
# PEFT before 0.22 applied that out_proj LoRA twice (huggingface/peft#3774: merged into the weight by
# the layer and again by out_proj itself); PEFT 0.22 applies it once and doubles ``lora_B`` on load for
# an adapter saved before 0.22 (its config's ``peft_version``, or none: saved before 0.18). Such an
# adapter's out_proj update is ``2 * scale * B @ A`` under every PEFT version; a later one's, under PEFT
# 0.22 and later, ``scale * B @ A`` (:attr:`AdapterConfig.out_proj_doubled`).
OUT_PROJ_DOUBLING = 2.0


def peft_layer(module: str, layers: Collection[str]) -> str:
    """The name of the layer whose configuration PEFT gives ``module``'s LoRA: itself, or the
    MultiheadAttention layer among ``layers`` (:func:`attention_layers`) whose ``out_proj`` it is."""
    if module.endswith(MHA_OUT_PROJ):
        layer = module[: -len(MHA_OUT_PROJ)]
        if layer in layers:
            return layer
    return module


def attention_layers(modules: Iterable[str]) -> frozenset[str]:
    """The MultiheadAttention layers among an adapter's ``modules``: those whose LoRA comes with
    an ``out_proj`` LoRA under ``<layer>.base_layer.out_proj`` (a module merely named so, with no
    LoRA of its own parent, is taken as itself)."""
    names = set(modules)
    return frozenset(
        m[: -len(MHA_OUT_PROJ)] for m in names if m.endswith(MHA_OUT_PROJ) and m[: -len(MHA_OUT_PROJ)] in names
    )


def attention_out_projs(modules: Iterable[str]) -> frozenset[str]:
    """The out_proj modules of the MultiheadAttention layers among ``modules`` (:func:`attention_layers`)."""
    return frozenset(layer + MHA_OUT_PROJ for layer in attention_layers(modules))


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # Same rule as peft.utils.other.get_pattern_key: the first pattern that matches
    # a dotted suffix of the module name wins. Keys were checked by
    # clair_cli.io.patterns.pattern_risk when the config was read; plain keys skip the regex engine.
    for key in patterns:
        if PLAIN_PATTERN.match(key):
            if _plain_match(key, module):
                return key
        elif re.match(PATTERN_KEY_WRAP.format(key=key), module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that decide what an adapter's update is."""

    peft_type: str = "LORA"
    base_model: str | None = None
    # The config's ``revision``: the base model's branch, tag or commit, which AutoPeftModel loads the base model at.
    base_revision: str | None = None
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
    # (rank, alpha) of each module of a file that gives them module by module (kohya alphas,
    # diffusers metadata: clair_cli.io.diffusion), looked up before the patterns, which then
    # only describe them (matching hundreds of exact patterns against every module is quadratic).
    exact: dict[str, tuple[int, float]] = field(default_factory=dict, compare=False, repr=False)
    # The MultiheadAttention layers of the file the config goes with (:func:`attention_layers`):
    # their out_proj LoRA takes the layer's rank and alpha.
    attention_layers: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)
    # The name PEFT matches rank_pattern / alpha_pattern keys against for a module that holds the LoRA of a
    # ``target_parameters`` entry: ``<module>.<parameter>`` (peft.tuners.tuners_utils._inject_parameters), not
    # the module's own name, which the file's keys carry.
    parameter_names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # Saved before PEFT 0.22 (see OUT_PROJ_DOUBLING): PEFT applies a MultiheadAttention's out_proj LoRA at
    # twice its scale. None: the config's peft_version is no version, which PEFT 0.22 refuses to load
    # such a LoRA under (the reader refuses an adapter that has one).
    out_proj_doubled: bool | None = field(default=False, compare=False, repr=False)

    def rank_for(self, module: str) -> int:
        """Rank PEFT gives ``module``: ``rank_pattern`` first, then ``r`` (:func:`peft_layer`'s)."""
        if module in self.exact:
            return self.exact[module][0]
        key = _pattern_key(self.rank_pattern, self.pattern_name(module))
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """Alpha PEFT gives ``module``: ``alpha_pattern`` first, then ``lora_alpha`` (:func:`peft_layer`'s)."""
        if module in self.exact:
            return self.exact[module][1]
        key = _pattern_key(self.alpha_pattern, self.pattern_name(module))
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def pattern_name(self, module: str) -> str:
        """The name PEFT matches ``module``'s rank_pattern / alpha_pattern keys against: its parameter's
        (:attr:`parameter_names`), its MultiheadAttention layer's (:func:`peft_layer`), or its own."""
        return self.parameter_names.get(module) or peft_layer(module, self.attention_layers)

    def scale_for(self, module: str, r: int | None = None) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA; twice that for the out_proj LoRA of a
        MultiheadAttention in an adapter saved before PEFT 0.22 (:attr:`out_proj_doubled`)."""
        rank = self.rank_for(module) if r is None else r
        alpha = self.alpha_for(module)
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return scale * OUT_PROJ_DOUBLING if self.doubles(module) else scale

    def doubles(self, module: str) -> bool:
        """Whether PEFT applies ``module``'s LoRA at twice its scale: the out_proj of a MultiheadAttention
        (:func:`peft_layer`) in an adapter saved before PEFT 0.22 (:data:`OUT_PROJ_DOUBLING`)."""
        return bool(self.out_proj_doubled) and peft_layer(module, self.attention_layers) != module

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
