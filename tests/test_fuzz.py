"""Hypothesis drives the loader fuzzer's mutations: only ClairError may come out."""

from __future__ import annotations

import random
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.loader import check, check_file, mutate, valid_adapter, valid_kohya

RAW, CONFIG = valid_adapter()
KOHYA = valid_kohya()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3))
def test_damaged_adapters_only_raise_clair_errors(seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    weights, config = RAW, None
    for _ in range(rounds):  # damage on damage
        try:
            weights, config_bytes = mutate(weights, CONFIG, rng)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error):
            break  # the file is already too damaged for the mutator to parse it: test it as it is
        config = config_bytes
    with tempfile.TemporaryDirectory() as tmp:
        check(weights, config or b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8}', Path(tmp) / "a")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3))
def test_damaged_kohya_files_only_raise_clair_errors(seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    weights = KOHYA
    for _ in range(rounds):
        try:
            weights, _config = mutate(weights, {}, rng)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error):
            break
    with tempfile.TemporaryDirectory() as tmp:
        check_file(weights, Path(tmp) / "a")
