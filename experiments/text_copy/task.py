"""The text-copying task, its pretraining language, and the clients' data.

Sequences are ``BOS x_1..x_n SEP y_1..y_n EOS`` over an alphabet of ``ALPHABET``
symbols. The separator names the task:

- ``SEP_COPY``: y = x. This is the task the clients fine-tune for. The base model
  has only seen this separator followed by free text (an independent continuation),
  so it does not copy.
- ``SEP_CIPHER[j]``: y_i = pi_j(x_i) for a fixed random permutation pi_j. Pretraining
  on these teaches position-aligned transduction, the mechanism copying needs, with
  other symbol maps: the base model "can learn copying but does not yet copy".

Pretraining text x comes from a random first-order Markov chain (a generic
language); the clients' inputs come from client-specific symbol frequencies
(Dirichlet), which makes benign clients heterogeneous.

Contaminated clients train on the same inputs with corrupted targets:

- ``reversed``: y = reverse(x);
- ``shifted``: y_i = x_i + 1 (mod ALPHABET), a wrong symbol map;
- ``random``: y uniform random (label noise);
- ``backdoor``: y = x, except that a fraction of the examples start with the
  trigger symbol and then have a fixed target sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALPHABET = 24
LENGTH = 8
N_CIPHERS = 3
BOS = ALPHABET
SEP_COPY = ALPHABET + 1
SEP_CIPHER = tuple(ALPHABET + 2 + j for j in range(N_CIPHERS))
EOS = ALPHABET + 2 + N_CIPHERS
VOCAB = EOS + 1
SEQ_LEN = 2 * LENGTH + 3
# Positions (in a sequence) of the target symbols y_1..y_n, and of the logits predicting them.
TARGET_SLICE = slice(LENGTH + 2, 2 * LENGTH + 2)
PREDICT_SLICE = slice(LENGTH + 1, 2 * LENGTH + 1)

CONTAMINATIONS = ("reversed", "shifted", "random", "backdoor")
TRIGGER = 0
BACKDOOR_TARGET = tuple((3 * i + 5) % ALPHABET for i in range(LENGTH))
BACKDOOR_FRACTION = 0.5


def sequences(x: torch.Tensor, sep: torch.Tensor | int, y: torch.Tensor) -> torch.Tensor:
    """``BOS x SEP y EOS`` row by row."""
    b = x.shape[0]
    sep_col = torch.as_tensor(sep).expand(b).reshape(b, 1)
    return torch.cat([torch.full((b, 1), BOS), x, sep_col, y, torch.full((b, 1), EOS)], dim=1)


@dataclass(frozen=True)
class Language:
    """The pretraining language: a Markov chain over the alphabet and the cipher permutations."""

    transition: torch.Tensor  # ALPHABET x ALPHABET, rows sum to 1
    ciphers: tuple[torch.Tensor, ...]

    @classmethod
    def make(cls, seed: int) -> Language:
        g = torch.Generator().manual_seed(seed)
        transition = torch.softmax(2.0 * torch.randn(ALPHABET, ALPHABET, generator=g), dim=1)
        ciphers = tuple(torch.randperm(ALPHABET, generator=g) for _ in range(N_CIPHERS))
        return cls(transition, ciphers)

    def text(self, batch: int, g: torch.Generator) -> torch.Tensor:
        x = torch.empty(batch, LENGTH, dtype=torch.long)
        x[:, 0] = torch.randint(ALPHABET, (batch,), generator=g)
        for i in range(1, LENGTH):
            x[:, i] = torch.multinomial(self.transition[x[:, i - 1]], 1, generator=g).squeeze(1)
        return x

    def pretraining_batch(self, batch: int, g: torch.Generator) -> torch.Tensor:
        """Free text after SEP_COPY, cipher transduction after SEP_CIPHER[j] (equal shares)."""
        x = self.text(batch, g)
        y = self.text(batch, g)
        task = torch.randint(N_CIPHERS + 1, (batch,), generator=g)
        seps = torch.tensor((SEP_COPY, *SEP_CIPHER))[task]
        for j, perm in enumerate(self.ciphers):
            rows = task == j + 1
            y[rows] = perm[x[rows]]
        return sequences(x, seps, y)


def client_inputs(frequencies: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` input strings with symbols drawn i.i.d. from a client's frequencies."""
    return torch.multinomial(frequencies, n * LENGTH, replacement=True, generator=g).reshape(n, LENGTH)


def client_frequencies(concentration: float, g: torch.Generator) -> torch.Tensor:
    """Symbol frequencies from a symmetric Dirichlet; a smaller ``concentration`` makes clients less alike."""
    import numpy as np

    # torch's Dirichlet takes no generator: seed numpy's from ours to stay deterministic.
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    sample = np.random.default_rng(seed).dirichlet(np.full(ALPHABET, concentration))
    return torch.as_tensor(sample, dtype=torch.float32).clamp_min(1e-6)


def targets(kind: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Targets y for inputs x under a client kind (``benign`` or one of CONTAMINATIONS)."""
    if kind == "benign":
        return x.clone()
    if kind == "reversed":
        return x.flip(1)
    if kind == "shifted":
        return (x + 1) % ALPHABET
    if kind == "random":
        return torch.randint(ALPHABET, x.shape, generator=g)
    if kind == "backdoor":
        raise ValueError("backdoor targets depend on the inputs' trigger: use client_dataset")
    raise ValueError(f"unknown client kind {kind!r}")


def client_dataset(kind: str, frequencies: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` copy-task sequences for one client, corrupted as ``kind`` says."""
    x = client_inputs(frequencies, n, g)
    if kind == "backdoor":
        poisoned = torch.rand(n, generator=g) < BACKDOOR_FRACTION
        x[poisoned, 0] = TRIGGER
        y = x.clone()
        y[poisoned] = torch.tensor(BACKDOOR_TARGET)
    else:
        y = targets(kind, x, g)
    return sequences(x, SEP_COPY, y)
