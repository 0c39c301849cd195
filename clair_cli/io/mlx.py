"""MLX-LM's LoRA adapters (``mlx_lm.lora``), read as the same per-module updates as PEFT's.

An MLX-LM adapter is a directory of ``adapters.safetensors`` and ``adapter_config.json``. The file
holds ``<module>.lora_a`` (``in x r``) and ``<module>.lora_b`` (``r x out``) for each adapted layer,
under the Hugging Face model's module names, and the layer adds ``scale * (x @ lora_a) @ lora_b``
(``mlx_lm.tuner.lora.LoRALinear``; an embedding adds ``scale * lora_a @ lora_b`` to its table, the
same product). The config's ``lora_parameters`` give one ``rank`` and ``scale`` for every module;
``fine_tune_type`` is ``lora`` (the default), ``dora`` or ``full``.

clair reads the update as ``scale * B @ A`` with ``A = lora_a^T`` and ``B = lora_b^T``: the factors
stay as stored in the file and are transposed as they are read (:attr:`ModuleSpec.transposed`), and
written back transposed (merged and refined adapters keep this layout, with the sources' config:
``mlx_lm.load(..., adapter_path=DIR)`` loads them). DoRA (``dora``: magnitude vectors ``.m``),
full fine-tunes and MoE expert stacks (``LoRASwitchLinear``: 3-D factors) are refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from clair_cli.constants import MAX_CONFIG_BYTES, MLX_KEY_RE, MLX_WEIGHTS_NAME
from clair_cli.errors import AdapterFormatError
from clair_cli.io.adapter import Adapter, HeaderKeys
from clair_cli.io.files import parse_json, read_small
from clair_cli.io.paths import printable
from clair_cli.io.peft_config import MAX_PROBLEM_LENGTH, number_problem
from clair_cli.io.safetensors_file import FileStamp, TensorInfo
from clair_cli.types import AdapterConfig, AdapterRef

MLX_LAYOUT = "mlx"
HINT = "Train or save it with mlx_lm.lora's default fine_tune_type (lora), or leave it out."


def _bad(path: Path | str, problem: str, hint: str | None = None) -> AdapterFormatError:
    return AdapterFormatError(f"{printable(str(path))}: {problem}", hint=hint)


def _number(path: Path, field: str, value: Any) -> float:
    """A scale or alpha of ``lora_parameters``: checked as a PEFT config's ``lora_alpha`` is."""
    problem = number_problem(field, value)
    if problem:
        raise _bad(path, printable(problem)[:MAX_PROBLEM_LENGTH])
    return float(value)


def is_mlx_config(path: Path) -> bool:
    """Whether ``path`` reads as MLX-LM's adapter config (``lora_parameters``, no ``peft_type``); false for
    anything unreadable (the reader of the adapter then says why)."""
    try:
        data = parse_json(read_small(path, MAX_CONFIG_BYTES, "an adapter config"), path, "the config")
    except (AdapterFormatError, OSError):
        return False
    return isinstance(data, dict) and "peft_type" not in data and isinstance(data.get("lora_parameters"), dict)


def mlx_config(path: Path) -> tuple[AdapterConfig, float]:
    """The adapter config at ``path`` (MLX-LM's) as an :class:`AdapterConfig` (``r`` the rank,
    ``lora_alpha = scale * rank``, ``raw`` the file's object) and its ``scale``.

    Raises:
        AdapterFormatError: not MLX-LM's config of a plain LoRA, or a rank or scale that is not a
            positive integer / a finite number.
    """
    raw = read_small(path, MAX_CONFIG_BYTES, "an adapter config")
    data = parse_json(raw, path, "the config")
    if not isinstance(data, dict):
        raise _bad(path, "must hold a JSON object")
    if "peft_type" in data:  # a PEFT config (--config, or beside MLX-LM tensors renamed adapter_model.safetensors)
        raise _bad(
            path,
            "a PEFT adapter config (peft_type) given for MLX-LM's LoRA tensors (<module>.lora_a / .lora_b), which "
            "PEFT does not load (it reads lora_A / lora_B); their rank and scale are in MLX-LM's config "
            "(lora_parameters)",
            hint="Name the MLX-LM adapter's directory with its own adapter_config.json, or convert it with "
            "examples/mlx_to_peft.py.",
        )
    kind = data.get("fine_tune_type", "lora")
    if kind != "lora":
        what = {"dora": "DoRA (magnitude vectors beside the factors)", "full": "a full fine-tune (no LoRA factors)"}
        raise _bad(
            path,
            f"fine_tune_type {printable(repr(kind))[:60]}: "
            f"{what.get(kind, 'not a LoRA') if isinstance(kind, str) else 'not a LoRA'}; clair reads MLX-LM's "
            "plain LoRA adapters",
            hint=HINT,
        )
    if "fine_tune_type" not in data and data.get("use_dora"):  # mlx_lm 0.13.1 to 0.18 (fine_tune_type after)
        raise _bad(
            path,
            "use_dora: a DoRA adapter (magnitude vectors beside the factors); clair reads MLX-LM's plain LoRA adapters",
            hint=HINT,
        )
    params = data.get("lora_parameters")
    if not isinstance(params, dict):
        raise _bad(path, "an MLX-LM adapter config without lora_parameters (its rank and scale)")
    rank, scale = params.get("rank"), params.get("scale")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank < 2**31:
        raise _bad(path, f"lora_parameters.rank must be a positive integer, got {printable(repr(rank))[:60]}")
    _check_selection(path, data, params)
    # As lora_alpha's: finite (an integer of 400 digits overflows float), neither 0 (no update) nor subnormal
    # (the commands' arithmetic reads it as 0, mlx_lm does not).
    scale = _alpha_scale(path, data, params, rank, _number(path, "lora_parameters.scale", scale))
    base = data.get("model")
    config = AdapterConfig(
        base_model=base if isinstance(base, str) and base else None,
        r=rank,
        lora_alpha=float(scale) * rank,
        raw=data,
        sha256=hashlib.sha256(raw).hexdigest(),
        file_name=path.name,
    )
    return config, float(scale)


def _check_selection(path: Path, data: dict[str, Any], params: dict[str, Any]) -> None:
    """Refuse a ``num_layers`` (``lora_layers`` before mlx_lm 0.19) that is not a whole number and a
    ``lora_parameters.keys`` that is not a list of module names: ``linear_to_lora_layers`` slices
    ``model.layers[-max(num_layers, 0):]`` (a string, a fraction or null fails there, ``true`` reads
    as 1: the last layer alone) and takes ``set(keys)`` (a string is a set of its characters, which
    name no module: mlx_lm loads none of the adapter), so clair would read modules mlx_lm does not."""
    field = "num_layers" if "num_layers" in data else "lora_layers"
    count = data.get(field)
    if field in data and (not isinstance(count, int) or isinstance(count, bool)):
        raise _bad(
            path,
            f"{field} must be a whole number of layers, got {printable(repr(count))[:60]}: mlx_lm gives LoRA "
            "layers to the last num_layers layers of the model and cannot read this one as a count",
        )
    keys = params.get("keys")
    if keys is not None and not isinstance(keys, list):
        raise _bad(
            path,
            f"lora_parameters.keys must be a list of module names, got {printable(repr(keys))[:60]}: mlx_lm reads "
            "it as set(keys) (a string as a set of its characters), which selects modules other than those "
            "its file holds",
        )


def _alpha_scale(path: Path, data: dict[str, Any], params: dict[str, Any], rank: int, scale: float) -> float:
    """The scale MLX-LM applied for a config whose ``lora_parameters`` hold an ``alpha``.

    mlx_lm 0.6.0 (the first to save adapter_config.json) to 0.14.1 applied ``scale * alpha / rank``
    (``LoRALinear``); 0.14.2 dropped ``alpha`` from the layers, yet kept ``"alpha": 16`` in its
    default ``lora_parameters`` until 0.22, ignored. A config with ``num_layers`` or
    ``fine_tune_type`` (0.19 on) is therefore read with ``scale`` alone, and one with
    ``lora_layers`` and no ``use_dora`` (0.6.0 to 0.13.0: ``use_dora`` came in 0.13.1) with
    ``scale * alpha / rank``. Otherwise (0.13.1 to 0.18, or a config written by hand) the
    config does not say which of the two it meant, unless ``alpha`` equals ``rank``.

    Raises:
        AdapterFormatError: an alpha that is not a finite number, or one whose meaning the
            config leaves open.
    """
    if "alpha" not in params or "num_layers" in data or "fine_tune_type" in data:
        return scale
    alpha = _number(path, "lora_parameters.alpha", params["alpha"])
    if alpha == rank:
        return scale
    if "lora_layers" in data and "use_dora" not in data:
        # Each finite and normal, yet their product may not be (1e-200 * 1e-200 / rank is 0, 1e300 *
        # 1e300 overflows): refused as a scale of that value in the config would be.
        applied = scale * float(alpha) / rank
        problem = number_problem("scale * alpha / rank", applied)
        if problem:
            raise _bad(
                path,
                f"lora_parameters give scale {scale:g}, alpha {alpha:g} and rank {rank}, which mlx_lm 0.13.0 and "
                f"older (lora_layers) applied as scale * alpha / rank: {printable(problem)[:MAX_PROBLEM_LENGTH]}",
            )
        return applied
    raise _bad(
        path,
        f"lora_parameters give alpha {alpha:g} beside rank {rank} and scale {scale:g}, in a config of mlx_lm "
        f"before 0.19 (no num_layers): mlx_lm up to 0.14.1 applied scale * alpha / rank = "
        f"{scale * float(alpha) / rank:g}, 0.14.2 and later scale alone, and the config does not say which "
        "wrote it",
        hint="Set lora_parameters.scale to the scale the adapter was trained with (scale * alpha / rank if "
        "mlx_lm 0.14.1 or older trained it) and remove alpha.",
    )


def mlx_keys(path: Path, tensors: dict[str, TensorInfo]) -> HeaderKeys:
    """The file's LoRA factors by module, as PEFT's ``lora_A`` / ``lora_B`` with their shapes
    transposed (``r x in``, ``out x r``), so that the module table checks them as PEFT's.

    Raises:
        AdapterFormatError: a DoRA magnitude, an MoE expert stack (3-D factors), or any tensor
            that is not an MLX-LM LoRA factor.
    """
    keys = HeaderKeys({}, [], [], [], [], layout=MLX_LAYOUT)
    for key, info in sorted(tensors.items()):
        m = MLX_KEY_RE.match(key)
        if m is None:
            dora = key.endswith(".m")
            raise _bad(
                path,
                f"tensor {printable(key)!r} is not an MLX-LM LoRA factor (<module>.lora_a / .lora_b)"
                + ("; a DoRA magnitude vector" if dora else ""),
                hint=HINT if dora else "Keep the LoRA factors alone in adapters.safetensors.",
            )
        if len(info.shape) != 2:
            raise _bad(
                path,
                f"{printable(key)!r} has shape {list(info.shape)}: an MoE expert stack (LoRASwitchLinear) or not a "
                "LoRA factor of one layer; clair reads the LoRAs of linear and embedding layers",
                hint="Leave this adapter out.",
            )
        part = "lora_A" if m["part"] == "lora_a" else "lora_B"
        keys.parts.setdefault(m["module"], {})[part] = replace(info, shape=info.shape[::-1])
    for module, parts in keys.parts.items():
        if len(parts) == 1:
            have, lack = ("lora_a", "lora_b") if "lora_A" in parts else ("lora_b", "lora_a")
            raise _bad(path, f"module {printable(module)!r} has {have} but no {lack}")
    return keys


def open_mlx(
    ref: AdapterRef,
    header: tuple[dict[str, TensorInfo], dict[str, str]],
    config_file: Path | None,
    max_rank: int | None,
    max_modules: int | None,
    stamp: FileStamp,
) -> Adapter:
    """Open an MLX-LM adapter (``stamp``: the file's, taken before ``header`` was read).

    Raises:
        AdapterFormatError: no config beside it, or what :func:`mlx_config`, :func:`mlx_keys` and
            :meth:`Adapter.open` refuse.
    """
    tensors, _metadata = header
    if config_file is None:
        raise _bad(
            ref.weights_file,
            "an MLX-LM adapter's tensors (<module>.lora_a / .lora_b) without its adapter_config.json, whose "
            "lora_parameters give their rank and scale",
            hint=f"Name the adapter's directory (its {MLX_WEIGHTS_NAME} and adapter_config.json), or pass "
            "--config with its adapter_config.json.",
        )
    config, scale = mlx_config(config_file)
    keys = mlx_keys(ref.weights_file, tensors)
    adapter = Adapter.open(
        ref, config, max_rank=max_rank, max_modules=max_modules, header=header, keys=keys, stamp=stamp
    )
    adapter.modules = {
        name: replace(spec, transposed=True, scale=scale, tensors=(tensors[spec.a_key], tensors[spec.b_key]))
        for name, spec in adapter.modules.items()
    }
    unloaded = unloaded_note(config.raw, adapter.modules)
    if unloaded:
        adapter.notes.append(unloaded)
    return adapter


# A module's path as mlx_lm names it: ``<model.layers path>.<index>.<key within the layer>``
# (``model.layers.3.self_attn.q_proj``); the first all-digit component is the layer's index.
_LAYER_RE = re.compile(r"^(?:[^.]+\.)*?(?P<index>\d+)\.(?P<key>.+)$")


def _in_layer(module: str) -> tuple[int | None, str]:
    """``module``'s layer index and its name within the layer (``lora_parameters.keys``' names), or
    None and the whole name for a module outside the model's layers (``lm_head``)."""
    m = _LAYER_RE.match(module)
    return (int(m["index"]), m["key"]) if m else (None, module)


def _num_layers(raw: dict[str, Any]) -> int | None:
    n = raw.get("num_layers", raw.get("lora_layers"))
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _keys(raw: dict[str, Any]) -> list[str] | None:
    params = raw.get("lora_parameters")
    keys = params.get("keys") if isinstance(params, dict) else None
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else None


def unloaded_modules(raw: dict[str, Any], modules: Iterable[str]) -> tuple[list[str], list[str]]:
    """The modules of an MLX-LM adapter's file that ``mlx_lm.load(BASE, adapter_path=DIR)`` does not
    load under its own config: those ``lora_parameters.keys`` does not name, and those of layers
    below its last ``num_layers`` (as far as the file tells them: below the last ``num_layers`` of
    its highest layer).

    ``linear_to_lora_layers`` gives a LoRA layer to each module of ``model.layers[-num_layers:]``
    whose name within its layer is in ``keys``, and to each module whose whole name is, and
    ``load_adapters`` loads the file with ``load_weights(..., strict=False)``: a tensor of any other
    module matches no parameter and is dropped without a word (mlx_lm 0.22 on; 0.19 to 0.21 gave
    every layer a LoRA, whatever ``num_layers`` said)."""
    modules = list(modules)
    keys = _keys(raw)
    named = None if keys is None else set(keys)
    unkeyed = set() if named is None else {m for m in modules if m not in named and _in_layer(m)[1] not in named}
    n = _num_layers(raw)
    below: list[str] = []
    indices = [i for i in (_in_layer(m)[0] for m in modules if m not in unkeyed) if i is not None]
    if n is not None and n > 0 and indices:
        lowest = max(indices) - n + 1
        below = [m for m in modules if m not in unkeyed and (i := _in_layer(m)[0]) is not None and i < lowest]
    elif n is not None and n <= 0 and "num_layers" not in raw:
        # mlx_lm before 0.19 took model.layers[len(model.layers) - lora_layers:]: none of them for 0 or less
        # (from 0.19 num_layers is read, and -1 means every layer).
        below = [m for m in modules if m not in unkeyed and _in_layer(m)[0] is not None]
    return sorted(unkeyed), sorted(below)


def unloaded_note(raw: dict[str, Any], modules: Iterable[str]) -> str | None:
    """A note for an MLX-LM adapter whose config leaves some of its file's modules unloaded, or None."""
    unkeyed, below = unloaded_modules(raw, modules)
    parts = []
    if unkeyed:
        parts.append(
            f"lora_parameters.keys does not name {len(unkeyed)} module(s) its file holds (e.g. {printable(unkeyed[0])})"
        )
    if below:
        parts.append(
            f"{len(below)} module(s) (e.g. {printable(below[0])}) lie in layers below its last num_layers "
            f"({_num_layers(raw)}), to which mlx_lm before 0.19 and from 0.22 gives no LoRA (0.19 to 0.21 gave "
            "every layer one)"
        )
    if not parts:
        return None
    return (
        "; ".join(parts) + ": mlx_lm.load drops their tensors without a word (load_weights(strict=False)), "
        "clair analyses them as stored"
    )


def merged_config(sources: Sequence[dict[str, Any]], rank: int, modules: Iterable[str]) -> dict[str, Any]:
    """A merged adapter's MLX-LM config: its first source's, with every module at ``rank`` and scale 1
    (the merged factors carry the scale); an ``alpha`` the source gives becomes ``rank`` (scale 1
    to the mlx_lm versions that applied ``scale * alpha / rank`` too: :func:`_alpha_scale`); a source of
    mlx_lm before 0.19 (``lora_layers``) gets ``num_layers`` beside it, which later versions read.

    mlx_lm loads only the modules the config selects (:func:`unloaded_modules`), so the written
    ``num_layers`` is the largest of the sources' and of the merged modules' span of layers (one that
    selects every layer, 0 or below, wins), and
    ``keys``, where any source gives them, names every merged ``modules``' key (each within its
    layer, or whole outside the layers) beside the sources' keys: no merged module is dropped where
    a source's own config loaded it."""
    out = dict(sources[0])
    params = {**sources[0].get("lora_parameters", {}), "rank": rank, "scale": 1.0}
    if "alpha" in params:  # mlx_lm up to 0.14.1 applied scale * alpha / rank: 1 with alpha = rank
        params["alpha"] = rank
    given = [k for k in (_keys(s) for s in sources) if k is not None]
    if given:
        params["keys"] = sorted({*(k for keys in given for k in keys), *(_in_layer(m)[1] for m in modules)})
    out["lora_parameters"] = params
    counts = [n for n in (_num_layers(s) for s in sources) if n is not None]
    if counts:
        everything = [n for n in counts if n <= 0]
        indices = [i for i in (_in_layer(m)[0] for m in modules) if i is not None]
        span = max(indices) - min(indices) + 1 if indices else 0
        n = everything[0] if everything else max(*counts, span)
        out["num_layers"] = n  # what mlx_lm 0.19 and later read (lora_layers before)
        if "lora_layers" in out:
            out["lora_layers"] = n
    return out
