"""Base model names compared as what they name, not as spelled.

``./base``, ``base`` and ``/abs/path/base`` are one model when they name one local
directory; ``roberta-base`` and ``FacebookAI/roberta-base`` are one hub model, because the
Hub moved its early un-namespaced models into organisations and redirects the old ids.
No network: the moved ids are a fixed table.
"""

from __future__ import annotations

import os

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
