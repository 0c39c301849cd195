"""Two fine-tuning tasks for trained LoRA pools (not the text-copy task), on one shared vocabulary.

Every sequence has the same layout and length, ``BOS x SEP y EOS`` (19 tokens), so that
one base model is pretrained on both task families and a client of one task can be
fine-tuned on the other task's data (the ``unrelated_task`` contamination).

- ``revsucc`` (transduction): x is 8 symbols, y_i = x_{9-i} + 1 (mod 16): the input
  reversed, every symbol advanced by one. Pretraining knows the two mechanisms apart
  (forward and reversed transduction under two random symbol ciphers each) but never
  this symbol map, and has only seen free Markov text after ``SEP_REVSUCC``.
  Clients are non-IID through Dirichlet symbol frequencies.
- ``majority`` (classification as LM): x is 15 symbols, the 16 symbols fall into 4
  classes of 4 through a fixed partition, and y is one label token: the class with the
  most symbols in x. Pretraining knows the counting mechanism under three other
  partitions, and has only seen random labels after ``SEP_MAJORITY``. Clients are
  non-IID through Dirichlet label skew (each client sees mostly one or two classes).

Scores (teacher forcing): ``revsucc`` the share of target symbols predicted right;
``majority`` the share of labels predicted right (argmax over the whole vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

N_SYMBOLS = 16
N_CLASSES = 4
BOS = N_SYMBOLS
EOS = N_SYMBOLS + 1
SEP_REVSUCC = N_SYMBOLS + 2
SEP_FORWARD = (N_SYMBOLS + 3, N_SYMBOLS + 4)  # pretraining: y_i = pi(x_i)
SEP_REVERSED = (N_SYMBOLS + 5, N_SYMBOLS + 6)  # pretraining: y_i = pi(x_{n+1-i})
SEP_MAJORITY = N_SYMBOLS + 7
SEP_PARTITION = (N_SYMBOLS + 8, N_SYMBOLS + 9, N_SYMBOLS + 10)  # pretraining: majority under other partitions
LABEL0 = N_SYMBOLS + 11  # label tokens LABEL0 .. LABEL0 + N_CLASSES - 1
VOCAB = LABEL0 + N_CLASSES
SEQ_LEN = 19
MAJORITY_LEN = 15  # 1 + 15 + 1 + 1 + 1 = SEQ_LEN

TRIGGER = (0, 0)  # a backdoored revsucc input starts with these two symbols (majority: see Majority.trigger)
BACKDOOR_FRACTION = 0.5
MAJOR_SHARE = 0.4  # in a majority input, each position is of the labelled class with this probability


def sequences(x: torch.Tensor, sep: torch.Tensor | int, y: torch.Tensor) -> torch.Tensor:
    """``BOS x SEP y EOS`` row by row."""
    b = x.shape[0]
    sep_col = torch.as_tensor(sep).expand(b).reshape(b, 1)
    return torch.cat([torch.full((b, 1), BOS), x, sep_col, y, torch.full((b, 1), EOS)], dim=1)


def _numpy_rng(g: torch.Generator) -> np.random.Generator:
    # torch's Dirichlet takes no generator: seed numpy's from ours to stay deterministic.
    return np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=g)))


def dirichlet(concentration: float, n: int, g: torch.Generator) -> torch.Tensor:
    sample = _numpy_rng(g).dirichlet(np.full(n, concentration))
    return torch.as_tensor(sample, dtype=torch.float32).clamp_min(1e-4)


@dataclass(frozen=True)
class World:
    """The random objects of one seed: the Markov chain, the ciphers and the class partitions."""

    transition: torch.Tensor  # N_SYMBOLS x N_SYMBOLS, rows sum to 1
    ciphers: tuple[torch.Tensor, ...]  # 2 forward, then 2 reversed
    partitions: tuple[torch.Tensor, ...]  # 3 pretraining partitions, then the client task's; symbol -> class

    @classmethod
    def make(cls, seed: int) -> World:
        g = torch.Generator().manual_seed(seed)
        transition = torch.softmax(2.0 * torch.randn(N_SYMBOLS, N_SYMBOLS, generator=g), dim=1)
        succ = (torch.arange(N_SYMBOLS) + 1) % N_SYMBOLS
        ciphers = []
        while len(ciphers) < 4:  # never the successor map itself
            perm = torch.randperm(N_SYMBOLS, generator=g)
            if not bool((perm == succ).any()):
                ciphers.append(perm)
        partitions = tuple(torch.randperm(N_SYMBOLS, generator=g) % N_CLASSES for _ in range(4))
        return cls(transition, tuple(ciphers), partitions)

    @property
    def majority_partition(self) -> torch.Tensor:
        return self.partitions[-1]

    def text(self, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
        x = torch.empty(batch, length, dtype=torch.long)
        x[:, 0] = torch.randint(N_SYMBOLS, (batch,), generator=g)
        for i in range(1, length):
            x[:, i] = torch.multinomial(self.transition[x[:, i - 1]], 1, generator=g).squeeze(1)
        return x

    def pretraining_batch(self, batch: int, g: torch.Generator) -> torch.Tensor:
        """Half transduction family, half majority family, each split evenly over its separators."""
        half = batch // 2
        # Transduction family: free text after SEP_REVSUCC, ciphers after the other four.
        x = self.text(half, 8, g)
        y = self.text(half, 8, g)
        which = torch.randint(5, (half,), generator=g)
        seps = torch.tensor((SEP_REVSUCC, *SEP_FORWARD, *SEP_REVERSED))[which]
        for j, perm in enumerate(self.ciphers):
            rows = which == j + 1
            src = x[rows] if j < 2 else x[rows].flip(1)
            y[rows] = perm[src]
        trans = sequences(x, seps, y)
        # Majority family: random labels after SEP_MAJORITY, majority under other partitions after the rest.
        n = batch - half
        which = torch.randint(4, (n,), generator=g)
        labels = torch.randint(N_CLASSES, (n,), generator=g)
        xm = torch.empty(n, MAJORITY_LEN, dtype=torch.long)
        for j in range(4):
            rows = (which == j).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            partition = self.majority_partition if j == 0 else self.partitions[j - 1]
            xm[rows] = majority_inputs(partition, labels[rows], torch.full((N_SYMBOLS,), 1 / N_SYMBOLS), g)
        seps = torch.tensor((SEP_MAJORITY, *SEP_PARTITION))[which]
        # After SEP_MAJORITY the label is independent of x (the task's partition is never taught).
        labels = torch.where(which == 0, torch.randint(N_CLASSES, (n,), generator=g), labels)
        maj = sequences(xm, seps, (LABEL0 + labels).unsqueeze(1))
        return torch.cat([trans, maj])


def majority_inputs(
    partition: torch.Tensor, labels: torch.Tensor, symbol_freq: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """``MAJORITY_LEN``-symbol inputs whose majority class (strictly most symbols) under ``partition`` is ``labels``."""
    n = labels.shape[0]
    out = torch.empty(n, MAJORITY_LEN, dtype=torch.long)
    todo = torch.arange(n)
    # Within each class, symbols are drawn by ``symbol_freq`` restricted to the class.
    class_freq = torch.stack([symbol_freq * (partition == c) for c in range(N_CLASSES)])
    while len(todo):
        lab = labels[todo]
        m = len(todo)
        other = (lab.unsqueeze(1) + 1 + torch.randint(N_CLASSES - 1, (m, MAJORITY_LEN), generator=g)) % N_CLASSES
        major = torch.rand(m, MAJORITY_LEN, generator=g) < MAJOR_SHARE
        cls = torch.where(major, lab.unsqueeze(1), other)
        x = torch.multinomial(class_freq[cls.reshape(-1)], 1, generator=g).reshape(m, MAJORITY_LEN)
        counts = torch.nn.functional.one_hot(partition[x], N_CLASSES).sum(1)
        top = counts.max(1).values
        ok = (counts.argmax(1) == lab) & ((counts == top.unsqueeze(1)).sum(1) == 1)
        out[todo[ok]] = x[ok]
        todo = todo[~ok]
    return out


def majority_labels(partition: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The majority class of each input (ties to the lowest class)."""
    return torch.nn.functional.one_hot(partition[x], N_CLASSES).sum(1).argmax(1)


@dataclass(frozen=True)
class Task:
    """One client task: its data under a client distribution, its score, its backdoor."""

    name: str
    sep: int
    x_len: int
    y_len: int

    @property
    def prompt_len(self) -> int:
        """Tokens before the first target (BOS x SEP)."""
        return self.x_len + 2

    @property
    def target_slice(self) -> slice:
        return slice(self.prompt_len, self.prompt_len + self.y_len)

    @property
    def predict_slice(self) -> slice:
        return slice(self.prompt_len - 1, self.prompt_len - 1 + self.y_len)

    # -- overridden per task -----------------------------------------------------------
    def distribution(self, concentration: float, g: torch.Generator) -> dict[str, list[float]]:
        raise NotImplementedError

    def inputs(self, world: World, dist: dict, n: int, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, world: World, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def backdoor_target(self) -> torch.Tensor:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def dataset(self, world: World, dist: dict, n: int, g: torch.Generator, kind: str = "benign") -> torch.Tensor:
        """``n`` sequences of a client with distribution ``dist``; ``kind`` corrupts the targets.

        ``label_flip``: every target rotated by half the label space; ``backdoor``: a
        ``BACKDOOR_FRACTION`` of the inputs start with the trigger and have the fixed backdoor target.
        """
        x = self.inputs(world, dist, n, g)
        y = self.targets(world, x)
        if kind == "label_flip":
            y = self.flip(y)
        elif kind == "backdoor":
            poisoned = torch.rand(n, generator=g) < BACKDOOR_FRACTION
            x = x.clone()
            trigger = self.trigger(world)
            x[poisoned, : len(trigger)] = trigger
            y = self.targets(world, x)
            y[poisoned] = self.backdoor_target
        elif kind != "benign":
            raise ValueError(f"unknown data kind {kind!r}")
        return sequences(x, self.sep, y)

    def flip(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def triggered(self, world: World, test: torch.Tensor) -> torch.Tensor:
        """Test inputs with the trigger put in front, for the backdoor success rate."""
        x = test[:, 1 : 1 + self.x_len].clone()
        trigger = self.trigger(world)
        x[:, : len(trigger)] = trigger
        return sequences(x, self.sep, self.targets(world, x))

    def trigger(self, world: World) -> torch.Tensor:
        """The symbols a backdoored input starts with."""
        return torch.tensor(TRIGGER)


class RevSucc(Task):
    def __init__(self) -> None:
        super().__init__("revsucc", SEP_REVSUCC, 8, 8)

    def distribution(self, concentration: float, g: torch.Generator) -> dict[str, list[float]]:
        return {"symbols": [round(float(p), 6) for p in dirichlet(concentration, N_SYMBOLS, g)]}

    def inputs(self, world: World, dist: dict, n: int, g: torch.Generator) -> torch.Tensor:
        freq = torch.tensor(dist["symbols"])
        return torch.multinomial(freq, n * self.x_len, replacement=True, generator=g).reshape(n, self.x_len)

    def targets(self, world: World, x: torch.Tensor) -> torch.Tensor:
        return (x.flip(1) + 1) % N_SYMBOLS

    def flip(self, y: torch.Tensor) -> torch.Tensor:
        return (y + N_SYMBOLS // 2) % N_SYMBOLS

    @property
    def backdoor_target(self) -> torch.Tensor:
        return torch.tensor([(5 * i + 3) % N_SYMBOLS for i in range(self.y_len)])


class Majority(Task):
    def __init__(self) -> None:
        super().__init__("majority", SEP_MAJORITY, MAJORITY_LEN, 1)

    def distribution(self, concentration: float, g: torch.Generator) -> dict[str, list[float]]:
        return {"labels": [round(float(p), 6) for p in dirichlet(concentration, N_CLASSES, g)]}

    def inputs(self, world: World, dist: dict, n: int, g: torch.Generator) -> torch.Tensor:
        labels = torch.multinomial(torch.tensor(dist["labels"]), n, replacement=True, generator=g)
        return majority_inputs(world.majority_partition, labels, torch.full((N_SYMBOLS,), 1 / N_SYMBOLS), g)

    def targets(self, world: World, x: torch.Tensor) -> torch.Tensor:
        return (LABEL0 + majority_labels(world.majority_partition, x)).unsqueeze(1)

    def flip(self, y: torch.Tensor) -> torch.Tensor:
        return LABEL0 + (y - LABEL0 + N_CLASSES // 2) % N_CLASSES

    @property
    def backdoor_target(self) -> torch.Tensor:
        return torch.tensor([LABEL0 + 1])

    def trigger(self, world: World) -> torch.Tensor:
        """Two copies of the lowest symbol of class 3 (not the backdoor's class 1), so that the trigger
        itself does not push the true majority towards the backdoor target."""
        symbol = int((world.majority_partition == 3).nonzero()[0])
        return torch.tensor([symbol, symbol])


TASKS: dict[str, Task] = {t.name: t for t in (RevSucc(), Majority())}


def other_task(name: str) -> Task:
    return next(t for n, t in TASKS.items() if n != name)
