"""Parse a PEFT ``adapter_config.json`` into an :class:`AdapterConfig`.

Only LoRA is accepted. Every field that changes the update (r, lora_alpha,
use_rslora, rank_pattern, alpha_pattern, fan_in_fan_out) is type-checked, so a
hand-edited config fails here with the field's name rather than later.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

from clair_cli.constants import CONFIG_NAME, MAX_CONFIG_BYTES, MAX_PATTERNS
from clair_cli.errors import AdapterFormatError
from clair_cli.io.files import parse_json, read_small
from clair_cli.io.paths import printable
from clair_cli.io.patterns import ALTERNATION_MIN_LENGTH, LAYERS_PATTERN_WRAP, pattern_risk, split_alternation
from clair_cli.types import PATTERN_KEY_WRAP, AdapterConfig

MAX_BASE_MODEL_LENGTH = 4096  # characters of base_model_name_or_path (PATH_MAX)
# What PEFT's LoraConfig gives a config that leaves r or lora_alpha out (PEFT loads it so).
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8


MAX_PROBLEM_LENGTH = 500  # characters of a config error's text: fields may hold megabytes


def _fail(path: Path | str, problem: str) -> AdapterFormatError:
    if len(problem) > MAX_PROBLEM_LENGTH:  # a value quoted in the problem: cut, not the whole field
        problem = problem[:MAX_PROBLEM_LENGTH] + "... (cut)"
    return AdapterFormatError(
        f"{printable(str(path))}: {problem}",
        hint=f"Fix the field in {CONFIG_NAME} or re-save the adapter with PEFT's save_pretrained().",
    )


def _positive_int(path: Path | str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, f"{field} must be a positive integer, got {value!r}")
    return value


def number_problem(field: str, value: Any) -> str | None:
    """Why ``value`` cannot be ``field``, a scale or an alpha (not a finite number, 0, or subnormal), or None."""
    try:  # an integer past float's range (10**400) overflows isfinite
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        shown = (
            repr(value)
            if not isinstance(value, int) or value.bit_length() < 128
            else f"an integer of {len(str(value))} digits"
        )
        return f"{field} must be a finite number, got {shown}"
    # From the bits, not by comparing: the commands flush subnormal numbers to zero, comparisons too.
    magnitude = struct.unpack("<Q", struct.pack("<d", float(value)))[0] & ~(1 << 63)
    if magnitude == 0:
        return f"{field} is 0, which makes the update zero"
    if magnitude < 1 << 52:  # subnormal: the commands' arithmetic reads it as 0, a loader does not
        return f"{field} is {value!r}, under float64's normal range (2.2e-308)"
    return None


def _finite(path: Path | str, field: str, value: Any) -> float:
    problem = number_problem(field, value)
    if problem:
        raise _fail(path, problem)
    return float(value)


def _flag(path: Path | str, field: str, value: Any) -> bool:
    """A boolean field (absent or null: false). A string such as ``"false"`` is refused, not
    read as Python's ``bool("false")``, which is true and would change the update's scale."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _fail(path, f"{field} must be true or false, got {value!r}")
    return value


def _pattern_dict(path: Path | str, field: str, value: Any, convert: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"{field} must be an object mapping module patterns to values")
    if len(value) > MAX_PATTERNS:
        raise _fail(path, f"{field} has {len(value)} entries; clair accepts at most {MAX_PATTERNS}")
    out = {}
    for key, val in value.items():
        try:
            re.compile(key)
            # PEFT (peft.utils.other.get_pattern_key) and clair (clair_cli.types._pattern_key) match the
            # key wrapped: a key that compiles alone may not compile there ("(?i)q_proj": a global flag
            # no longer at the start; an "idx"-named group), and PEFT fails to load the adapter.
            re.compile(PATTERN_KEY_WRAP.format(key=key))
        except (re.error, RecursionError, OverflowError) as exc:
            raise _fail(
                path,
                f"{field} key {key[:80]!r} is not a valid regular expression as PEFT matches it, "
                f"{PATTERN_KEY_WRAP.format(key='KEY')} ({exc})",
            ) from exc
        why = pattern_risk(key)
        if why:
            raise _fail(path, f"{field} key {key[:80]!r} {why}; refused so that matching stays bounded")
        out[key] = convert(path, f"{field}[{key!r}]", val)
    return out


def _str_list(path: Path | str, field: str, value: Any) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(path, f"{field} must be a string or a list of strings")


def _regex(path: Path | str, field: str, value: str, wrap: str | None = None) -> str:
    """A module-selecting field given as one string, which PEFT full-matches as a regular
    expression when it loads the adapter (an invalid one makes loading fail there). ``wrap``:
    the expression PEFT builds around it (``{key}`` stands for the value), compiled instead: PEFT
    compiles that alone (a layers_pattern ``"*layers"`` does not compile by itself, and PEFT loads it),
    so each value is compiled once."""
    split = split_alternation(value) if wrap is None and len(value) >= ALTERNATION_MIN_LENGTH else None
    try:
        if wrap is not None:
            re.compile(wrap.format(key=value))
        elif split is None:
            re.compile(value)
        elif split[1] is not None:  # names alone always compile (a merged adapter's 10,000 took 3 s)
            re.compile(split[1])
    except (re.error, RecursionError, OverflowError) as exc:
        how = "" if wrap is None else f" as PEFT matches it, {wrap.format(key='PATTERN')}"
        raise _fail(path, f"{field} {value[:80]!r} is not a valid regular expression{how} ({exc})") from exc
    return value


def _layers(path: Path | str, layers: Any, pattern: Any) -> None:
    """``layers_to_transform`` (null, an index or a list of indices) and ``layers_pattern`` (null,
    a regular expression or a list of them), as PEFT reads them."""
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    ):
        raise _fail(path, "layers_to_transform must be a layer index or a list of layer indices")
    patterns = _str_list(path, "layers_pattern", pattern)
    if isinstance(patterns, tuple) and len(patterns) > MAX_PATTERNS:  # each is compiled, here
        raise _fail(path, f"layers_pattern has {len(patterns)} entries; clair accepts at most {MAX_PATTERNS}")
    for p in [patterns] if isinstance(patterns, str) else patterns or ():
        _regex(path, "layers_pattern", p, LAYERS_PATTERN_WRAP)


def saved_before_out_proj_fix(data: dict[str, Any]) -> bool | None:
    """Whether PEFT 0.22+ doubles a MultiheadAttention out_proj's ``lora_B`` when it loads an adapter of
    this config (``peft.tuners.lora.model.LoraModel._remap_adapter_state_dict_for_load``, see
    :data:`clair_cli.types.OUT_PROJ_DOUBLING`): no ``peft_version`` key (saved before PEFT 0.18), a release
    before 0.21.1, or a release (not a dev build) before 0.22.0. None: the value is not a version string,
    which PEFT fails on for such an adapter (it keeps a ``null`` as its own version: not doubled)."""
    from packaging.version import InvalidVersion, Version

    if "peft_version" not in data:
        return True
    said = data["peft_version"]
    if said is None:
        return False
    if not isinstance(said, str):
        return None
    try:
        version = Version(said.partition("@")[0])
    except InvalidVersion:
        return None
    release = Version(version.base_version)
    return release < Version("0.21.1") or (not version.is_devrelease and release < Version("0.22.0"))


def parse_config(data: dict[str, Any], path: Path | str) -> AdapterConfig:
    """Validate a config dict as PEFT would apply it.

    Args:
        data: the parsed JSON object.
        path: where it came from, for messages.

    Returns:
        The adapter config.

    Raises:
        AdapterFormatError: not a LoRA config, or a field is missing or invalid.
    """
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str):  # null, a number, a list: no type's name, which PEFT looks the value up by
        shown = "null" if peft_type is None else json.dumps(peft_type, default=str)[:80]
        raise AdapterFormatError(
            f"{printable(str(path))}: peft_type is {printable(shown)}, which names no PEFT type: PEFT cannot load "
            "this config (PeftConfig looks peft_type up among its types' names and fails"
            + (", KeyError None)" if peft_type is None else ")"),
            hint=f'Set "peft_type": "LORA" in {CONFIG_NAME} (what save_pretrained() writes), or re-save the adapter '
            "with PEFT.",
        )
    if peft_type.upper() != "LORA":
        raise AdapterFormatError(
            f"{path}: peft_type is {peft_type!r}; clair analyses LoRA adapters only",
        )
    base_model = data.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise _fail(path, "base_model_name_or_path must be a string")
    if base_model is not None and len(base_model) > MAX_BASE_MODEL_LENGTH:
        # A hub id has at most 96 characters and a path at most PATH_MAX (4,096 bytes on Linux):
        # longer is no model's name, and every message and card that quotes it would carry it.
        raise _fail(
            path,
            f"base_model_name_or_path is {len(base_model)} characters long; clair accepts at most "
            f"{MAX_BASE_MODEL_LENGTH}",
        )
    base_revision = data.get("revision")
    if base_revision is not None and (not isinstance(base_revision, str) or len(base_revision) > MAX_BASE_MODEL_LENGTH):
        raise _fail(
            path,
            f"revision (the base model's branch, tag or commit) must be a string of at most {MAX_BASE_MODEL_LENGTH}",
        )
    to_save = _str_list(path, "modules_to_save", data.get("modules_to_save"))
    for field in ("target_modules", "exclude_modules"):
        if isinstance(data.get(field), str):
            _regex(path, field, data[field])
    _str_list(path, "exclude_modules", data.get("exclude_modules"))
    _layers(path, data.get("layers_to_transform"), data.get("layers_pattern"))
    if isinstance(data.get("target_modules"), str) and data.get("layers_to_transform") is not None:
        # PEFT's config (LoraConfig in 0.21, every PeftConfig since 0.22) refuses the pair as it is built, so
        # PeftModel.from_pretrained loads no such adapter (null is the only value it takes beside a string).
        raise _fail(
            path,
            f"layers_to_transform {printable(repr(data['layers_to_transform']))[:80]} is given with a target_modules "
            'string (a regular expression or "all-linear"), which PEFT refuses as it loads the config '
            "(ValueError: `layers_to_transform` cannot be used when `target_modules` is a str)",
        )
    return AdapterConfig(
        peft_type="LORA",
        base_model=base_model or None,
        base_revision=base_revision or None,
        r=_positive_int(path, "r", data.get("r", PEFT_DEFAULT_R)),
        lora_alpha=_finite(path, "lora_alpha", data.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        use_rslora=_flag(path, "use_rslora", data.get("use_rslora")),
        rank_pattern=_pattern_dict(path, "rank_pattern", data.get("rank_pattern"), _positive_int),
        alpha_pattern=_pattern_dict(path, "alpha_pattern", data.get("alpha_pattern"), _finite),
        fan_in_fan_out=_flag(path, "fan_in_fan_out", data.get("fan_in_fan_out")),
        target_modules=_str_list(path, "target_modules", data.get("target_modules")),
        use_dora=_flag(path, "use_dora", data.get("use_dora")),
        lora_bias=_flag(path, "lora_bias", data.get("lora_bias")),
        modules_to_save=(to_save,) if isinstance(to_save, str) else tuple(to_save or ()),
        trainable_token_indices=data.get("trainable_token_indices"),
        raw=data,
        out_proj_doubled=saved_before_out_proj_fix(data),
    )


def load_config(path: Path, peft_loads: bool = True) -> AdapterConfig:
    """Read and validate ``adapter_config.json`` at ``path``. ``peft_loads``: the config PEFT loads with
    the weights (beside them), which must say ``"peft_type": "LORA"`` as PEFT spells it; False for a
    description given with ``--config`` (of loose weights files, which no PEFT loader opens), where a
    missing or lowercase ``peft_type`` means LoRA as before."""
    raw = read_small(path, MAX_CONFIG_BYTES, "an adapter config")
    data = parse_json(raw, path, "the config")
    if not isinstance(data, dict):
        raise _fail(path, "must hold a JSON object")
    if "peft_type" not in data and isinstance(data.get("lora_parameters"), dict):
        # MLX-LM's (clair_cli.io.mlx), beside a PEFT-layout weights file: PEFT's defaults would stand in
        # for its rank and scale.
        raise AdapterFormatError(
            f"{printable(str(path))}: an MLX-LM adapter config (lora_parameters), which describes MLX-LM's "
            "adapters.safetensors, not the PEFT-layout weights file read with it",
            hint="Keep an MLX-LM adapter's directory to its adapters.safetensors and adapter_config.json, or "
            "give the PEFT adapter its own adapter_config.json.",
        )
    config = parse_config(data, path)  # a non-LoRA peft_type is refused there, with its own message
    if peft_loads:
        _check_peft_type(data, path)
    return replace(config, sha256=hashlib.sha256(raw).hexdigest(), file_name=path.name)


def _check_peft_type(data: dict[str, Any], path: Path) -> None:
    """An adapter config file must say ``"peft_type": "LORA"``, spelled so: PEFT looks the value up among
    its types' names (``PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]``, case-sensitive), so PeftModel.from_pretrained,
    AutoPeftModel and transformers' load_adapter fail on ``"lora"`` (KeyError 'lora') and on a config
    without one (KeyError 'peft_type'). clair would otherwise audit, and pass, an adapter that none of
    them loads. (A config dict given in code, diffusers' metadata and Flower's LoraConfig are read by
    :func:`parse_config`, which takes ``peft_type`` as optional.)"""
    peft_type = data.get("peft_type")
    if peft_type == "LORA":
        return
    said = "has no peft_type" if peft_type is None else f"says peft_type {printable(repr(peft_type))}"
    raise AdapterFormatError(
        f'{printable(str(path))}: {said}; PEFT loads only "peft_type": "LORA", spelled so '
        f"(PeftModel.from_pretrained and transformers' load_adapter fail here with KeyError "
        f"{printable(repr('peft_type' if peft_type is None else peft_type))}), so no PEFT loader applies this adapter",
        hint=f'Set "peft_type": "LORA" in {CONFIG_NAME} (what save_pretrained() writes), or re-save the adapter '
        "with PEFT.",
    )
