"""The one writer of PEFT ``adapter_config.json`` files, and PEFT's rules for reading them.

A config clair writes loads in PEFT as computed, whatever the base model's module names:

- ``rank_pattern`` / ``alpha_pattern`` keys are ``^`` + the escaped full module name. PEFT
  matches a key as ``re.match(rf"(.*\\.)?({key})$", name)`` (``peft.utils.other.get_pattern_key``),
  so a bare ``z.proj`` would also match ``y.z.proj`` and ``zxproj``; the anchored, escaped key
  matches the one module only.
- ``target_modules`` is the union of the inputs' lists when, under PEFT's list rule (a name
  equal to an entry or ending in ``.entry``), it selects every module written and none that
  an input holds but the output leaves out; otherwise an exact regular expression of the
  module names, which PEFT full-matches.
- ``layer_replication`` is kept (every input must agree: the module names of replicated layers
  mean nothing without it); ``task_type`` is kept when every input agrees and it carries no
  head; anything else is a deterministic function of the set of inputs, never of their order.
- LoRA variants whose update is not ``scale * B @ A`` (aLoRA, QALoRA, target_parameters, ...)
  are refused rather than written as a plain LoRA.

Before it is returned, every config is read back with clair's own parser and PEFT's matching
rules (:func:`check_written`): each module gets its rank and scale and is targeted, and no
other module an input holds is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from clair_cli.constants import CONFIG_NAME, MAX_PATTERNS, PEFT_KEY_PREFIX
from clair_cli.errors import IncompatibleAdapters, OutputError
from clair_cli.io.paths import printable
from clair_cli.io.patterns import ALTERNATION_MIN_LENGTH, LAYERS_PATTERN_WRAP, pattern_risk, split_alternation
from clair_cli.types import OUT_PROJ_DOUBLING, AdapterConfig, attention_layers, attention_out_projs, peft_layer

if TYPE_CHECKING:
    from clair_cli.io.adapter import Adapter

# A task type with a head makes PEFT expect the head's weights (modules_to_save) among the
# adapter's, which a merge of LoRA factors does not carry.
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
# The head modules PEFT's model class for such a task type adds to modules_to_save when it loads the adapter
# (peft.peft_model.PeftModelForSequenceClassification and its siblings), whatever the config lists: they take
# those modules (and those under them) out of LoRA too, so a LoRA of theirs in the file is not applied.
TASK_HEAD_MODULES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
# LoRA variants whose effect is not the weight update scale * B @ A (PEFT's is_lora_variant
# fields, and fields that change what is adapted): a merge or a rewritten config would be wrong.
UNSUPPORTED_FIELDS = {
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies the update only after its tokens",
    "use_qalora": "QALoRA (use_qalora) applies lora_A to pooled inputs",
    "target_parameters": "target_parameters adapts nn.Parameters, not modules",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not a plain B @ A",
    "arrow_config": "Arrow (arrow_config) routes between several LoRAs",
    "kasa_config": "KaSA (kasa_config) modifies the base weights",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples the update",
}
# The values with which PEFT (0.21) leaves each variant off wherever the adapter is loaded. Its
# sub-config fields turn even ``{}`` into a config object (KasaConfig(), ...), which switches the
# variant on; alora_invocation_tokens=[] makes an aLoRA layer of a bitsandbytes-quantized base layer
# (``is not None``) though not of a plain one (``bool``), and clair cannot tell which the adapter
# goes into; a boolean or target_parameters is off when false or empty.
VARIANT_OFF: dict[str, tuple[Any, ...]] = {
    "alora_invocation_tokens": (None,),
    "use_qalora": (None, False),
    "target_parameters": (None, []),
    "use_bdlora": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
}
# init_lora_weights values with which PEFT rewrites the base model's weights when it loads the adapter
# (peft.tuners.lora.layer.LoraLayer.update_layer: pissa_init, corda_init, astra_init (PEFT 0.22: any
# "astra..."; like CorDA, it needs preprocess_astra's eigenvectors on the base model and subtracts the
# initial scale * B0 @ A0 from the base weights), olora_init, loftq_init), so that the adapter's change to
# the base model is not scale * B @ A. "eva", "gaussian", "orthogonal", "mica", "nora" (PEFT 0.22) and
# "lora_ga" (whose loading falls back to a plain init: no gradients are attached) leave the base weights
# alone; their factors, loaded from the file, are a plain LoRA.
BASE_REWRITING_INITS = ("PiSSA", "CorDA", "Astra", "OLoRA", "LoftQ")
PEFT_LIST_ALL_LINEAR = "all-linear"
_REPEATS = re.compile(r"(?<!\\)[*+?{]")  # an unescaped repetition


def exact_key(module: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT matches to ``module`` and nothing else."""
    return "^" + re.escape(module)


def exact_targets(modules: Iterable[str]) -> str:
    """A ``target_modules`` regular expression that PEFT full-matches to exactly ``modules``."""
    return "|".join(re.escape(m) for m in sorted(set(modules)))


def _safe_match(pattern: str, fn: Any, text: str) -> bool | None:
    """``fn(pattern, text)`` for an input's regular expression; None when it cannot be matched safely.

    A pattern without repetition (an alternation of names, as :func:`exact_targets` writes)
    matches in linear time whatever its length; others must pass :func:`pattern_risk`.
    """
    if _REPEATS.search(pattern) and pattern_risk(pattern, anchored=fn in (re.fullmatch, re.match)):
        return None
    try:
        return fn(pattern, text) is not None
    except (re.error, RecursionError, OverflowError):
        return None


def _alternation(pattern: str) -> tuple[frozenset[str], re.Pattern[str] | None] | None:
    """:func:`~clair_cli.io.patterns.split_alternation` of ``pattern``, its other branches compiled (None:
    no other branch), prepared once per pattern; None where it is not such a pattern or they cannot be
    matched safely. An alternation of 10,000 module names (what :func:`exact_targets` writes for a merged
    MoE adapter) took 7 ms per module as one regular expression, 70 s per adapter."""

    def build(text: str) -> tuple[frozenset[str], re.Pattern[str] | None] | None:
        split = split_alternation(text)
        if split is None:
            return None
        names, rest = split
        if rest is None:
            return names, None
        if _REPEATS.search(rest) and pattern_risk(rest, anchored=True):
            return None  # matched as a whole, to say it cannot be told
        try:
            return names, re.compile(rest)
        except (re.error, RecursionError, OverflowError):
            return None

    return _prepared("alternation", pattern, build)


def _fullmatches(pattern: str, module: str) -> bool | None:
    """``re.fullmatch(pattern, module)`` for a config's ``target_modules`` / ``exclude_modules`` string;
    None when it cannot be matched safely (:func:`_safe_match`). A long alternation of names is matched
    by a set lookup (:func:`_alternation`)."""
    split = _alternation(pattern) if len(pattern) >= ALTERNATION_MIN_LENGTH else None
    if split is None:
        return _safe_match(pattern, re.fullmatch, module)
    names, rest = split
    if module in names:
        return True
    try:
        return rest is not None and rest.fullmatch(module) is not None
    except (RecursionError, OverflowError):
        return None


def peft_selects(raw: Mapping[str, Any], module: str, layers: Collection[str] = ()) -> bool | None:
    """Whether PEFT gives ``module`` a LoRA layer under the config ``raw``
    (``peft.tuners.tuners_utils.check_target_module_exists``); None when it cannot be told
    from the config alone (no target_modules: PEFT's per-architecture default; an unsafe pattern).
    A MultiheadAttention's ``out_proj`` is selected with its attention layer among ``layers``
    (:func:`clair_cli.types.peft_layer`).

    Each list of the config is prepared once (:func:`_prepared`), so that a module costs time linear in
    its name, not in the lists' lengths: a 10 MiB config holds a million names, which took minutes for
    each module when they were scanned per module."""
    module = peft_layer(module, layers)
    excluded = _excluded(raw, module)
    if excluded is not False:
        return None if excluded is None else False
    targets = raw.get("target_modules")
    if targets is None or _all_linear(raw):  # "all-linear", as PEFT spells it
        return None
    if isinstance(targets, str):
        return _fullmatches(targets, module)
    names = _names(targets)
    if module in names:  # PEFT: the whole name (layers_to_transform not asked), else a suffix after a dot
        return True
    if names.isdisjoint(_dotted_suffixes(module)):
        return False
    return _in_layers(raw, module)


def _dotted_suffixes(module: str) -> list[str]:
    """``module`` and each of its suffixes that follows a dot: the names ``m == t or m.endswith(f".{t}")`` finds."""
    parts = module.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


# Prepared forms of a config's lists, by the list's identity (kept alive here, so the id is not reused).
_PREPARED: dict[tuple[str, int], tuple[Any, Any]] = {}


def _prepared(kind: str, value: Any, build: Any) -> Any:
    key = (kind, id(value))
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is value:
        return hit[1]
    if len(_PREPARED) >= 256:
        _PREPARED.clear()
    built = build(value)
    _PREPARED[key] = (value, built)
    return built


def _names(values: Any) -> frozenset[str]:
    return _prepared("names", values, lambda v: frozenset(x for x in v if isinstance(x, str)))


_WORD = re.compile(r"\w+")
# Regular expressions of a list (modules_to_save entries other than plain names, layers_pattern) matched
# per module at most: each costs about a microsecond per module, and a 10 MiB config holds a million.
# Past it, what the list selects is left unverified (None), as a target_modules string past the
# pattern bounds is: nothing PEFT loads is refused for it.
MAX_LISTED_PATTERNS = 256


def _save_patterns(to_save: Any) -> tuple[frozenset[str], list[re.Pattern[str] | None]]:
    r"""``modules_to_save`` (a name, a list, or anything else: none) as PEFT matches a module name to it,
    ``re.match(rf"(^|.*\.){m}($|\..*)", key)``: the names made of word characters (a whole dotted component
    of the module's name: no regex needed) and the others compiled once (None: unsafe or invalid). Prepared
    by the config's own value, not a list made per call (each one a new entry of the cache, which then
    emptied every 256 modules and prepared every list again)."""

    def build(value: Any) -> tuple[frozenset[str], list[re.Pattern[str] | None]]:
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        words = frozenset(m for m in values if isinstance(m, str) and _WORD.fullmatch(m))
        others: list[re.Pattern[str] | None] = []
        if sum(1 for m in values if not (isinstance(m, str) and m in words)) > MAX_LISTED_PATTERNS:
            return words, [None]  # unverified (past the bound)
        for m in values:
            if not isinstance(m, str) or m in words:
                continue
            pattern = rf"(^|.*\.){m}($|\..*)"
            try:
                risky = bool(_REPEATS.search(pattern) and pattern_risk(pattern, anchored=True))
                others.append(None if risky else re.compile(pattern))
            except (re.error, RecursionError, OverflowError):
                others.append(None)
        return words, others

    return _prepared("to_save", to_save, build)


def _excluded(raw: Mapping[str, Any], module: str) -> bool | None:
    """Whether ``exclude_modules`` or ``modules_to_save`` (with the task type's head, :data:`TASK_HEAD_MODULES`)
    takes ``module`` out of LoRA (None: unsafe pattern, and no other entry takes it out)."""
    exclude = raw.get("exclude_modules")
    if isinstance(exclude, str):
        hit = _fullmatches(exclude, module)
        if hit is None or hit:
            return hit
    elif isinstance(exclude, list) and not _names(exclude).isdisjoint(_dotted_suffixes(module)):
        return True
    to_save = raw.get("modules_to_save")
    task = raw.get("task_type")
    heads = TASK_HEAD_MODULES.get(task, ()) if isinstance(task, str) else ()
    components = module.split(".")
    if any(h in components for h in heads):
        return True
    words, others = _save_patterns(to_save)
    if not words.isdisjoint(components):
        return True
    unsafe = False
    for compiled in others:
        if compiled is None:
            unsafe = True
            continue
        try:
            if compiled.match(module) is not None:
                return True
        except (RecursionError, OverflowError):
            unsafe = True
    return None if unsafe else False


def _in_layers(raw: Mapping[str, Any], module: str) -> bool | None:
    """Whether ``layers_to_transform`` (with ``layers_pattern``) keeps ``module`` (None: cannot tell)."""
    layers = raw.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    if isinstance(layers, list):
        wanted = _prepared("layers", layers, lambda v: frozenset(v) if all(isinstance(i, int) for i in v) else None)
        if wanted is None:
            return None
    elif isinstance(layers, int):
        wanted = frozenset((layers,))
    else:
        return None
    pattern: Any = raw.get("layers_pattern")
    # An empty layers_pattern ("" or []) is PEFT's default pattern, as null is (check_target_module_exists).
    patterns = [pattern] if isinstance(pattern, str) and pattern else pattern if isinstance(pattern, list) else []
    if len(patterns) > MAX_LISTED_PATTERNS:
        return None
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    for compiled in _layer_patterns(pattern) if patterns else ():
        match = compiled.match(module) if compiled is not None else None
        if match is not None:
            break
    if match is None:
        return False
    return int(match.group("idx")) in wanted


def _layer_patterns(pattern: str | list[Any]) -> list[re.Pattern[str] | None]:
    """The config's ``layers_pattern`` (a string or a list) as PEFT matches each entry, compiled once per config
    (None: unsafe or invalid). Prepared by the config's own value, a string too: a list made per call was
    prepared again for every module."""

    def build(value: str | list[Any]) -> list[re.Pattern[str] | None]:
        out: list[re.Pattern[str] | None] = []
        for p in [value] if isinstance(value, str) else value:
            try:
                out.append(None if pattern_risk(p) else re.compile(LAYERS_PATTERN_WRAP.format(key=p)))
            except (re.error, RecursionError, OverflowError, TypeError):
                out.append(None)
        return out

    return _prepared("layers_pattern", pattern, build)


def ignored_modules(config: AdapterConfig, modules: Iterable[str]) -> list[str]:
    """The modules of an adapter's file that PEFT does not load under its own config. None can be
    told from the config where ``ensure_weight_tying`` is on: PEFT then also gives the layers tied
    to a targeted one (the ``lm_head`` of a tied ``embed_tokens``) its LoRA, and which those are,
    the model says."""
    if config.raw.get("ensure_weight_tying") is True:
        return []
    kinds = {m: getattr(spec, "kind", None) for m, spec in modules.items()} if isinstance(modules, Mapping) else {}
    modules = list(modules)
    layers = attention_layers(modules)
    # target_parameters names parameters (``mlp.down_proj.weight``): PEFT wraps the module that holds one.
    params = config.raw.get("target_parameters")
    named = params if isinstance(params, list) else []
    owners = [p.rsplit(".", 1)[0] for p in named if isinstance(p, str) and "." in p]
    # "all-linear": PEFT targets the model's nn.Linear / Conv1D layers but its output layer
    # (tuners_utils._maybe_include_all_linear_layers): an embedding's, a convolution's or lm_head's LoRA is not loaded.
    unlinear = {m for m in modules if kinds.get(m) in ("embedding", "conv") or m.split(".")[-1] == "lm_head"}
    return sorted(
        m
        for m in modules
        if (peft_selects(config.raw, m, layers) is False or (m in unlinear and _all_linear(config.raw)))
        and not any(m == o or m.endswith("." + o) for o in owners)
    )


# Layers that hold their weight as a parameter of their own (nn.Linear, transformers' Conv1D, nn.Embedding,
# nn.ConvNd): a target_parameters entry naming ``<layer>.weight`` names it (a MultiheadAttention's is in_proj_weight).
_WEIGHT_KINDS = ("linear", "embedding", "conv")


def parameter_collisions(config: AdapterConfig, modules: Mapping[str, Any]) -> list[str]:
    """The modules of an adapter's file that its ``target_modules`` selects and whose ``weight`` one of its
    ``target_parameters`` entries names (``<module>.weight`` equals the entry or ends in ``.entry``). PEFT 0.21 and
    0.22 refuse to load such an adapter, whatever the file holds (``ValueError: Trying to wrap an nn.Parameter of
    layer ... which is not a valid target. Make sure that this layer is not also targeted with target_modules``:
    ``BaseTuner.inject_adapter`` in 0.22, ``_inject_parameters`` in 0.21). Only modules of the file that
    :func:`peft_selects` surely selects are named: what else ``target_modules`` selects, the base model says."""
    params = config.raw.get("target_parameters")
    entries = _names(params) if isinstance(params, list) else frozenset()
    if not any(e == "weight" or e.endswith(".weight") for e in entries):
        return []
    layers = attention_layers(modules)
    return sorted(
        m
        for m, spec in modules.items()
        if getattr(spec, "kind", None) in _WEIGHT_KINDS
        and m not in layers
        and peft_layer(m, layers) == m
        and not entries.isdisjoint(_dotted_suffixes(f"{m}.weight"))
        and peft_selects(config.raw, m, layers) is True
    )


def _all_linear(raw: Mapping[str, Any]) -> bool:
    targets = raw.get("target_modules")
    # The length first: a merged adapter's target_modules string can be megabytes, lowered per module.
    return isinstance(targets, str) and len(targets) == len(PEFT_LIST_ALL_LINEAR) and targets.lower() == "all-linear"


def default_targets_note(config: AdapterConfig) -> str | None:
    """A note for a config that gives no ``target_modules`` (nor ``target_parameters``), or None: PEFT
    then targets its default modules for the base model's architecture (``_prepare_adapter_config``)."""
    raw = config.raw
    if raw.get("target_modules") is not None or raw.get("target_parameters"):
        return None
    return (
        "its config gives no target_modules: PEFT targets its default modules for the base model's architecture "
        "(q_proj and v_proj for Llama, Mistral, Qwen2...) and ignores this file's other modules; clair analyses "
        "every module as stored"
    )


def ignored_note(config: AdapterConfig, modules: Iterable[str]) -> str | None:
    """A note for an adapter whose config leaves some of its tensors unused in PEFT, or None."""
    ignored = ignored_modules(config, modules)
    if not ignored:
        return None
    return (
        "its config (target_modules / exclude_modules / modules_to_save / the head of its task_type) does not "
        f"select {len(ignored)} module(s) its file holds (e.g. {ignored[0]}): PEFT ignores those tensors when it "
        "loads this adapter, clair analyses them as stored"
    )


def _where(adapter: Adapter) -> str:
    return printable(str(adapter.ref.config_file or adapter.ref.weights_file))


def _normal(value: Any) -> Any:
    """A JSON value with tuples as lists, so that configs compare as written."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def _replication(adapter: Adapter) -> list[list[int]] | None:
    """The adapter's ``layer_replication`` as ``[[start, end], ...]``, or None.

    Raises:
        IncompatibleAdapters: not a list of ``[start, end]`` pairs of whole numbers.
    """
    value = adapter.config.raw.get("layer_replication")
    if not value:
        return None
    pairs = _normal(value)
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
        for p in pairs
    ):
        raise IncompatibleAdapters(
            f"{_where(adapter)}: layer_replication must be a list of [start, end] pairs, "
            f"got {printable(str(value))[:80]}",
            hint=f"Fix the field in {CONFIG_NAME}.",
        )
    return pairs


def refuse_mixed_replication(adapters: Sequence[Adapter]) -> None:
    """Refuse adapters whose ``layer_replication`` differs: PEFT rebuilds the base model's layers
    from it before it loads the factors, so the same module name then names different layers
    (and the replicated layers change the model even where no LoRA touches them).

    Raises:
        IncompatibleAdapters: naming two adapters' config files and their values.
    """
    replication = {repr(r) if (r := _replication(a)) else "none": a for a in adapters}
    if len(replication) > 1:
        (r1, a1), (r2, a2) = sorted(replication.items())[:2]
        raise IncompatibleAdapters(
            f"{_where(a1)}: layer_replication {r1[:80]} differs from {r2[:80]} in {_where(a2)}; the same module "
            "names then name different layers",
            hint="Analyse adapters trained with the same layer_replication together.",
        )


def variants_on(raw: Mapping[str, Any]) -> list[str]:
    """What each LoRA variant the config turns on does (:data:`UNSUPPORTED_FIELDS`), in its order."""
    return [
        why
        for name, why in UNSUPPORTED_FIELDS.items()
        if not any(
            raw.get(name) is off or (raw.get(name) == off and type(raw.get(name)) is type(off))
            for off in VARIANT_OFF[name]
        )
    ]


def random_init(raw: Mapping[str, Any]) -> bool:
    """Whether the config gives ``init_lora_weights`` a false value (``false``, ``0``, ``null``, ``""``):
    PEFT (``elif init_lora_weights:``) then leaves ``lora_A`` and ``lora_B`` at their layers' random
    initialisation, which every module the config targets and the file does not fill keeps."""
    return "init_lora_weights" in raw and not raw["init_lora_weights"]


def refuse_variants(adapters: Sequence[Adapter], what: str) -> None:
    """Refuse adapters whose config turns on a LoRA variant that ``what`` cannot reproduce, or an
    init with which PEFT rewrites the base weights (:func:`refuse_base_rewriting`).

    Raises:
        IncompatibleAdapters: naming the adapter's config file and the field.
    """
    for a in adapters:
        raw = a.config.raw
        for why in variants_on(raw):
            if why:
                raise IncompatibleAdapters(
                    f"{_where(a)}: {why}; clair cannot write a {what} that PEFT loads as computed",
                    hint="Leave this adapter out, or audit it only (clair audit).",
                )
    refuse_base_rewriting(adapters, what)


# init_lora_weights strings PEFT (0.21 and 0.22, LoraLayer.update_layer and reset_lora_parameters) takes exactly
# as written ("nora", NoRA, since 0.22: a normalised lora_A at initialisation, the base weights untouched), and
# those it takes in any case; "pissa" and "pissa_niter_N", any "corda..." and any "astra..." (PEFT 0.22)
# are PiSSA's, CorDA's and Astra's.
_PEFT_INITS_EXACT = ("loftq", "eva", "orthogonal", "lora_ga", "nora")
_PEFT_INITS_ANY_CASE = ("olora", "mica", "gaussian")


def unloadable_init(raw: Mapping[str, Any]) -> bool:
    """Whether the config's ``init_lora_weights`` is a value PEFT refuses as it loads the adapter
    (``ValueError: Unknown initialization``, or PiSSA's own check): a string other than its
    methods' names (case matters but for OLoRA, MiCA and Gaussian: ``"PiSSA"``, ``"LoftQ"``), or
    a true value that is neither ``true`` nor a string."""
    value = raw.get("init_lora_weights")
    if not value or value is True:
        return False
    if not isinstance(value, str):
        return True
    if value.startswith("pissa"):
        return value != "pissa" and re.fullmatch(r"pissa_niter_\d+", value) is None
    return not (
        value.startswith(("corda", "astra")) or value in _PEFT_INITS_EXACT or value.lower() in _PEFT_INITS_ANY_CASE
    )


def base_rewriting_init(raw: Mapping[str, Any]) -> str | None:
    """The method's name (PiSSA, CorDA, Astra, OLoRA, LoftQ) when the config's ``init_lora_weights`` makes PEFT
    rewrite the base weights as it loads the adapter (its tests, as in PEFT's update_layer), or None."""
    value = raw.get("init_lora_weights")
    if not isinstance(value, str) or unloadable_init(raw):
        return None
    if value.startswith("pissa"):
        return "PiSSA"
    if value.startswith("corda"):
        return "CorDA"
    if value.startswith("astra"):
        return "Astra"
    if value.lower() == "olora":
        return "OLoRA"
    if value == "loftq":
        return "LoftQ"
    return None


def megatron_note(config: AdapterConfig) -> str | None:
    """A note for an adapter of PEFT's tensor-parallel LoRA (``megatron_config`` with a
    ``tensor_model_parallel_size`` above 1, or one that does not say: Megatron's default is 1), or None.
    PEFT splits ``lora_A`` of a row-parallel layer by its input and ``lora_B`` of a column-parallel one by
    its output over the ranks (``LoraParallelLinear``), so a file one rank saved holds its shard."""
    value = config.raw.get("megatron_config")
    if not value:
        return None
    size = value.get("tensor_model_parallel_size", 1) if isinstance(value, Mapping) else None
    if isinstance(size, int) and not isinstance(size, bool) and size <= 1:
        return None
    said = f"tensor_model_parallel_size {printable(repr(size))}" if size is not None else "megatron_config"
    return (
        f"megatron_config ({said}): PEFT's tensor-parallel LoRA splits lora_A of row-parallel layers and lora_B of "
        "column-parallel ones over the ranks, so a file one rank saved holds that rank's shard; clair analyses the "
        "factors as stored, as a whole update"
    )


# LoftQ of Embedding and conv layers, by PEFT version (LoraLayer subclasses' update_layer): PEFT 0.22 skips it there
# ("Embedding layers don't support LoftQ or LoRA-GA, fall back to standard initialization"; conv alike), so their
# base weights stay as they are and the LoRA is plain, but it quantises the base weight of every Linear layer
# target_modules selects, which an adapter's files cannot rule out (the base model says what else the config
# selects); PEFT 0.21.2 calls loftq_init there without its config and fails (TypeError). So neither loads such an
# adapter as scale * B @ A for certain, and a merge stays refused.
LOFTQ_UNLINEAR = "LoftQ with LoRAs of Embedding / conv layers only"
LOFTQ_UNLINEAR_WHY = (
    "PEFT 0.22 leaves those layers' base weights as they are (a plain LoRA there) but quantises the base weights of "
    "any Linear layer target_modules also selects, which the adapter's files cannot rule out; PEFT 0.21.2 fails to "
    "load it (TypeError: loftq_init() missing 1 required positional argument: 'config')"
)


def loftq_unlinear(config: AdapterConfig, modules: Mapping[str, Any]) -> bool:
    """Whether the adapter is a LoftQ one whose file holds LoRAs of Embedding and conv layers alone
    (:data:`LOFTQ_UNLINEAR`): PEFT's key names (``lora_embedding_A``) and the factors' shapes (a kernel)
    tell those layers apart from a Linear's."""
    return (
        base_rewriting_init(config.raw) == "LoftQ"
        and bool(modules)
        and all(getattr(spec, "kind", None) in ("embedding", "conv") for spec in modules.values())
    )


def base_rewriting_note(config: AdapterConfig, modules: Mapping[str, Any] | None = None) -> str | None:
    """A note for an adapter whose ``init_lora_weights`` rewrites the base weights in PEFT, or None."""
    method = base_rewriting_init(config.raw)
    if method is None:
        return None
    value = printable(repr(config.raw.get("init_lora_weights")))
    if modules is not None and loftq_unlinear(config, modules):
        return (
            f"init_lora_weights {value} ({LOFTQ_UNLINEAR}): {LOFTQ_UNLINEAR_WHY}; clair analyses scale*B@A as stored "
            "(where target_modules selects Embedding / conv layers alone, PEFT 0.22 loads the same adapter with "
            "init_lora_weights true, which PEFT 0.21.2 loads too)"
        )
    return (
        f"init_lora_weights {value} ({method}): PEFT rewrites the "
        "base model's weights when it loads this adapter, so its change to the base model is not scale*B@A; "
        "clair analyses scale*B@A as stored (convert it to a plain LoRA with PEFT's save_pretrained("
        "path_initial_model_for_weight_conversion=...))"
    )


def refuse_base_rewriting(adapters: Sequence[Adapter], what: str) -> None:
    """Refuse adapters whose ``init_lora_weights`` (PiSSA, CorDA, Astra, OLoRA, LoftQ) makes PEFT rewrite the
    base weights at load: a ``what`` written from their factors would be a different model.

    Raises:
        IncompatibleAdapters: naming the adapter's config file and the value.
    """
    for a in adapters:
        method = base_rewriting_init(a.config.raw)
        if method is not None and loftq_unlinear(a.config, a.modules):
            raise IncompatibleAdapters(
                f"{_where(a)}: init_lora_weights {printable(repr(a.config.raw.get('init_lora_weights')))} "
                f"({LOFTQ_UNLINEAR}): {LOFTQ_UNLINEAR_WHY}; clair cannot write a {what} that PEFT loads as computed",
                hint="If target_modules selects Embedding / conv layers alone in the base model, set "
                f'"init_lora_weights": true in {CONFIG_NAME}: PEFT 0.22 loads the same plain LoRA, and PEFT 0.21.2 '
                "loads it too. Or audit it only (clair audit).",
            )
        if method is not None:
            value = printable(repr(a.config.raw.get("init_lora_weights")))
            raise IncompatibleAdapters(
                f"{_where(a)}: init_lora_weights {value} ({method}) makes PEFT rewrite the base model's weights "
                f"when it loads the adapter, so its update is not scale*B@A; clair cannot write a {what} that "
                "PEFT loads as computed",
                hint="Convert it to a plain LoRA first: PEFT's save_pretrained(..., "
                "path_initial_model_for_weight_conversion=<the adapter as initialised>) writes one with "
                "init_lora_weights=true. Or audit it only (clair audit).",
            )


DORA_EXTRA = "DoRA magnitude vectors"  # the kind of extra (:attr:`clair_cli.io.adapter.Adapter.extras`)


def refuse_dora(adapters: Sequence[Adapter], what: str) -> None:
    """Refuse DoRA adapters for a ``what`` that keeps their config and magnitude vectors but changes
    ``B`` or ``A`` (``clair refine``): PEFT applies DoRA as ``m * (W + s*B@A) / ||W + s*B@A||``, so
    with the magnitudes kept the written adapter does not apply the changed update ``s*B~@A~`` (nor
    that update's difference from the input's).

    Raises:
        IncompatibleAdapters: naming the adapter's config file.
    """
    for a in adapters:
        if DORA_EXTRA in a.extras or a.config.use_dora:
            raise IncompatibleAdapters(
                f"{_where(a)}: DoRA (use_dora, magnitude vectors) rescales each column of W + scale*B@A to its "
                f"stored magnitude when PEFT loads the adapter, so a {what} with its factors changed would not "
                "apply the update clair computed",
                hint="Leave DoRA adapters out of the pool, or audit them only (clair audit).",
            )


def refuse_unprefixed(adapters: Sequence[Adapter], what: str) -> None:
    """Refuse adapters holding LoRA factors without PEFT's key prefix, which PeftModel.from_pretrained
    does not load: a ``what`` clair writes carries the prefix, so it would apply updates that loading
    the inputs did not.

    Raises:
        IncompatibleAdapters: naming the adapter's weights file and a key.
    """
    for a in adapters:
        if a.unprefixed:
            spec = a.modules[a.unprefixed[0]]
            raise IncompatibleAdapters(
                f"{printable(str(a.ref.weights_file))}: {len(a.unprefixed)} module(s) stored without PEFT's key "
                f"prefix {PEFT_KEY_PREFIX!r} (e.g. {printable(spec.a_key)!r}), which PeftModel.from_pretrained "
                f"does not load; clair cannot write a {what} that loads as its inputs do",
                hint=f"Re-save the adapter with PEFT's save_pretrained(), or prefix its keys with {PEFT_KEY_PREFIX!r}.",
            )


@dataclass(frozen=True)
class ConfigPlan:
    """What a written config says beyond its modules' ranks and alphas.

    Attributes:
        base_model: ``base_model_name_or_path``.
        base_revision: ``revision``, the base model's (the inputs' one; None: PEFT's default).
        task_type: PEFT's task type, or None.
        targets: a ``target_modules`` list that PEFT's list rule maps to exactly the written
            modules; None: write :func:`exact_targets`.
        fan_in_fan_out: as the inputs (PEFT corrects it per layer type anyway).
        layer_replication: the inputs' ``layer_replication``, or None.
        known: every module an input holds (the written ones and those left out).
        notes: what the plan decided that a report should say.
    """

    base_model: str | None
    base_revision: str | None = None
    task_type: str | None = None
    targets: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    layer_replication: list[list[int]] | None = None
    known: frozenset[str] = frozenset()
    notes: list[str] = field(default_factory=list)


def _task_type(adapters: Sequence[Adapter], notes: list[str]) -> str | None:
    kinds = sorted({str(a.config.raw.get("task_type")) for a in adapters if a.config.raw.get("task_type")})
    untyped = any(not a.config.raw.get("task_type") for a in adapters)
    if len(kinds) == 1 and not untyped:
        if kinds[0] in HEAD_TASK_TYPES:
            notes.append(
                f"task_type {kinds[0]} not written: the merge carries no classification head, so the merged "
                "adapter loads on the base model with the base model's own head"
            )
            return None
        return kinds[0]
    if kinds:
        given = ", ".join(kinds + (["none"] if untyped else []))
        notes.append(
            f"the inputs' task_type values differ ({given}): written without one, so PEFT loads it on any model class"
        )
    return None


def _union_targets(adapters: Sequence[Adapter], written: set[str], known: set[str]) -> tuple[str, ...] | None:
    """The union of the inputs' target_modules lists, if PEFT's list rule maps it to ``written`` exactly."""
    union: set[str] = set()
    for a in adapters:
        raw = a.config.raw
        targets = raw.get("target_modules")
        if not isinstance(targets, list) or targets == [PEFT_LIST_ALL_LINEAR]:
            return None
        if any(raw.get(f) not in (None, [], "") for f in ("exclude_modules", "layers_to_transform", "modules_to_save")):
            return None
        union.update(targets)
    # PEFT's list rule: a name selects a module it equals or ends (after a dot). Names that end no
    # module any input holds select nothing clair writes: left out, so that a config listing
    # hundreds of thousands of names does not make the merged config too large to read back.
    suffixes = {".".join(parts[i:]) for m in known for parts in [m.split(".")] for i in range(len(parts))}
    union &= suffixes
    if not union:
        return None
    spec = {"target_modules": sorted(union)}
    if all(peft_selects(spec, m) for m in written) and not any(peft_selects(spec, m) for m in known - written):
        return tuple(sorted(union))
    return None


def plan_merged(adapters: Sequence[Adapter], written: Iterable[str], base_model: str | None) -> ConfigPlan:
    """The config plan of a merge of ``adapters`` that writes the modules ``written``.

    Raises:
        IncompatibleAdapters: an input turns on a LoRA variant (:data:`UNSUPPORTED_FIELDS`), an init
            that rewrites the base weights (:data:`BASE_REWRITING_INITS`), holds factors PEFT does not
            load (no key prefix), or the inputs replicate layers differently (``layer_replication``).
    """
    refuse_variants(adapters, "merged adapter")
    refuse_unprefixed(adapters, "merged adapter")
    written_set = set(written)
    known = set().union(*(set(a.modules) for a in adapters)) | written_set
    refuse_mixed_replication(adapters)
    layer_replication = _replication(adapters[0])
    notes: list[str] = []
    task_type = _task_type(adapters, notes)
    ignored = sorted({m for a in adapters for m in ignored_modules(a.config, a.modules)} & written_set)
    if ignored:
        notes.append(
            f"{len(ignored)} module(s) (e.g. {ignored[0]}) are held by input files whose own config does not "
            "select them, so PEFT ignores them when loading those inputs; clair merged them as stored and the "
            "merged adapter targets them"
        )
    layers = sorted(attention_layers(written_set))
    if layers and adapters[0].layout == "peft":
        notes.append(
            f"the out_proj LoRA of {len(layers)} MultiheadAttention layer(s) (e.g. {printable(layers[0])}) stores "
            "half the merged update in lora_B, under a config without peft_version: PEFT before 0.22 applies it "
            "twice and PEFT 0.22 and later doubles it on load (saying so in a warning), so both apply the merged update"
        )
    # The pool has one base model revision (build_pool refuses several), none where --base-model named the base
    # model: AutoPeftModel loads the base model at the written one.
    revisions = {a.config.base_revision for a in adapters}
    return ConfigPlan(
        base_model=base_model,
        base_revision=revisions.pop() if len(revisions) == 1 else None,
        task_type=task_type,
        targets=_union_targets(adapters, written_set, known),
        fan_in_fan_out=any(a.config.fan_in_fan_out for a in adapters),
        layer_replication=layer_replication,
        known=frozenset(known),
        notes=notes,
    )


def plan_own(adapter: Adapter) -> ConfigPlan:
    """The plan of a config written for one adapter that has none on disk (a bare file and flags)."""
    refuse_variants([adapter], "refined adapter")
    return ConfigPlan(
        base_model=adapter.base_model,
        base_revision=adapter.config.base_revision,
        fan_in_fan_out=adapter.config.fan_in_fan_out,
        known=frozenset(adapter.modules),
    )


# The configs clair writes carry no peft_version, which PEFT reads as saved before 0.22: PEFT of every
# version applies a MultiheadAttention's out_proj LoRA at twice the config's scale (before 0.22 by applying
# it twice, since by doubling lora_B on load; clair_cli.types.OUT_PROJ_DOUBLING). A merged adapter stores
# that module's B at half the merged update's (clair_cli.io.peft_writer), and loads as computed under both.


def lora_config(plan: ConfigPlan, modules: Mapping[str, tuple[int, float]], use_rslora: bool = False) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA whose module ``m`` has rank and alpha ``modules[m]`` (the out_proj
    of a MultiheadAttention at twice that scale, as PEFT applies it under a config without peft_version).

    The most common rank (and, among those, alpha) becomes ``r`` / ``lora_alpha``; every other
    module gets exact ``rank_pattern`` / ``alpha_pattern`` entries. The result is checked by
    :func:`check_written` before it is returned.

    Raises:
        OutputError: more pattern entries than clair (and a sane config) accepts.
    """
    if not modules:
        raise ValueError("no module to write")
    r = _most_common(rank for rank, _ in modules.values())
    alpha = _most_common(a for rank, a in modules.values() if rank == r)
    # A MultiheadAttention's out_proj takes its layer's rank and alpha: a key for it matches nothing.
    layers = attention_layers(modules)
    own = sorted((m, v) for m, v in modules.items() if peft_layer(m, layers) == m)
    rank_pattern = {exact_key(m): rk for m, (rk, _) in own if rk != r}
    alpha_pattern = {exact_key(m): _number(a) for m, (_, a) in own if a != alpha}
    if max(len(rank_pattern), len(alpha_pattern)) > MAX_PATTERNS:
        raise OutputError(
            f"the output would need {max(len(rank_pattern), len(alpha_pattern))} rank_pattern entries "
            f"(one per module whose rank differs from the most common); at most {MAX_PATTERNS} are written",
            hint="Pass --merge-rank N to write every module at one rank.",
        )
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": plan.task_type,
        "base_model_name_or_path": plan.base_model,
        "revision": plan.base_revision,
        "r": r,
        "lora_alpha": _number(alpha),
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": list(plan.targets) if plan.targets is not None else exact_targets(modules),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "layer_replication": plan.layer_replication,
        "fan_in_fan_out": plan.fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    check_written(config, modules, use_rslora, plan.known)
    return config


def _most_common(values: Iterable[Any]) -> Any:
    """The most frequent value; the smallest among equally frequent ones (independent of order)."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def check_written(
    config: dict[str, Any], modules: Mapping[str, tuple[int, float]], use_rslora: bool, known: Iterable[str] = ()
) -> None:
    """Read ``config`` back as PEFT would: every module in ``modules`` is targeted with its rank
    and scale, and no other ``known`` module is targeted.

    Raises:
        OutputError: it would not load as computed (a bug in clair: nothing is written).
    """
    from clair_cli.io.peft_config import parse_config

    layers = attention_layers(modules)
    cfg = replace(parse_config(config, CONFIG_NAME), attention_layers=layers)
    doubled = attention_out_projs(modules)  # PEFT doubles them under a config without peft_version
    for m, (rank, alpha) in modules.items():
        want = (alpha / rank**0.5 if use_rslora else alpha / rank) * (OUT_PROJ_DOUBLING if m in doubled else 1.0)
        selected = peft_selects(config, m, layers)
        if not selected or cfg.rank_for(m) != rank or abs(cfg.scale_for(m) - want) > 1e-9 * abs(want):
            raise OutputError(f"the written {CONFIG_NAME} would not give module {printable(m)} its rank and scale")
    stray = sorted(m for m in set(known) - set(modules) if peft_selects(config, m, layers))
    if stray:
        raise OutputError(f"the written {CONFIG_NAME} would also target module {printable(stray[0])}")
