"""Base model names compared as what they name, not as spelled.

``./base``, ``base`` and ``/abs/path/base`` are one model when they name one local
directory; ``roberta-base`` and ``FacebookAI/roberta-base`` are one hub model, because the
Hub moved its early un-namespaced models into organisations and redirects the old ids.
No network: the moved ids are a fixed table.
"""

from __future__ import annotations

import os
from pathlib import Path

# Legacy un-namespaced hub ids and the organisation repos the Hub now serves them from.
LEGACY_HUB_IDS: dict[str, str] = {
    **{
        n: f"openai-community/{n}"
        for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-gpt", "roberta-base-openai-detector")
    },
    **{
        n: f"google-bert/{n}"
        for n in (
            "bert-base-uncased",
            "bert-base-cased",
            "bert-large-uncased",
            "bert-large-cased",
            "bert-base-multilingual-cased",
            "bert-base-multilingual-uncased",
            "bert-base-chinese",
            "bert-large-uncased-whole-word-masking",
            "bert-large-cased-whole-word-masking",
        )
    },
    **{
        n: f"FacebookAI/{n}"
        for n in ("roberta-base", "roberta-large", "roberta-large-mnli", "xlm-roberta-base", "xlm-roberta-large")
    },
    **{
        n: f"distilbert/{n}"
        for n in (
            "distilbert-base-uncased",
            "distilbert-base-cased",
            "distilbert-base-multilingual-cased",
            "distilbert-base-uncased-finetuned-sst-2-english",
            "distilgpt2",
            "distilroberta-base",
        )
    },
    **{n: f"google-t5/{n}" for n in ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b")},
    **{n: f"albert/{n}" for n in ("albert-base-v2", "albert-large-v2", "albert-xlarge-v2", "albert-xxlarge-v2")},
}


def looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or os.path.isdir(os.path.expanduser(name))


def canonical_base_model(name: str) -> str:
    """What ``name`` names: an absolute, normalised path for a local directory (or a name
    spelled as a path), else the hub id with ``hf://`` and trailing slashes removed and a
    legacy id replaced by its organisation's."""
    name = name.strip()
    if looks_local(name):
        try:
            return os.path.realpath(os.path.expanduser(name))
        except (OSError, ValueError):  # a NUL byte, a name too long: compared as written
            return os.path.normpath(os.path.abspath(name))
    repo = name.removeprefix("hf://").strip("/")
    return LEGACY_HUB_IDS.get(repo, repo)


def same_model_note(names: list[str]) -> str | None:
    """A note for the report when the configs spell one base model in different ways."""
    distinct = sorted(set(names))
    if len(distinct) < 2:
        return None
    canon = canonical_base_model(distinct[0])
    why = "one local directory" if looks_local(distinct[0]) else f"the hub model {canon}"
    return f"base model named {', '.join(repr(n) for n in distinct)}: taken as the same model ({why})"


# transformers' model types whose linear layers are GPT-2's ``Conv1D`` (weight stored in x out): PEFT
# gives their LoRA layers fan_in_fan_out=True whatever a config says (warning where it says false).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Hub models of those types, by id (after canonical_base_model), known without their config.json.
CONV1D_HUB_MODELS = frozenset(
    [f"openai-community/{n}" for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-gpt")]
    + ["distilbert/distilgpt2"]
)
# The names of those layers in them (GPT-BigCode and GPT-Neo name nn.Linear layers so too).
CONV1D_LAYER_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
MAX_MODEL_CONFIG_BYTES = 1 << 20  # a model's config.json: a few KiB


def conv1d_base_model(name: str | None) -> bool | None:
    """Whether the base model ``name`` stores its LoRA-targeted layers as GPT-2's ``Conv1D`` does (PEFT's
    ``fan_in_fan_out``): from the ``model_type`` of its ``config.json`` (a local directory, or the Hugging
    Face cache, never the network), else from a fixed list of hub ids; None when nothing tells."""
    if not name:
        return None
    canon = canonical_base_model(name)
    config = None
    if looks_local(name):
        config = os.path.join(canon, "config.json")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(canon, "config.json")
            config = found if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - not a repo id huggingface_hub accepts, an unreadable cache: unknown
            config = None
    model_type = _model_type(config) if config else None
    if model_type is not None:
        return model_type in CONV1D_MODEL_TYPES
    return True if canon in CONV1D_HUB_MODELS else None


def _model_type(config: str) -> str | None:
    from clair_cli.errors import ClairError
    from clair_cli.io.files import parse_json, read_small

    try:
        data = parse_json(read_small(Path(config), MAX_MODEL_CONFIG_BYTES, "a model config"), config, "the config")
    except (ClairError, OSError, ValueError):
        return None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return model_type if isinstance(model_type, str) else None
