"""The text-copying experiment's pieces: its data, its evaluator against PEFT, its methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from experiments.text_copy import evaluate, task, train  # noqa: E402

SAMPLES = Path(__file__).parents[1] / "sample_adapters"


def test_sequences_layout_and_targets() -> None:
    g = torch.Generator().manual_seed(0)
    freq = task.client_frequencies(1.0, g)
    assert torch.isclose(freq.sum(), torch.tensor(1.0), atol=1e-4)
    x = task.client_inputs(freq, 5, g)
    s = task.sequences(x, task.SEP_COPY, x)
    assert s.shape == (5, task.SEQ_LEN)
    assert (
        (s[:, 0] == task.BOS).all() and (s[:, task.LENGTH + 1] == task.SEP_COPY).all() and (s[:, -1] == task.EOS).all()
    )
    assert torch.equal(s[:, task.TARGET_SLICE], x)
    assert torch.equal(task.targets("reversed", x, g), x.flip(1))
    assert torch.equal(task.targets("shifted", x, g), (x + 1) % task.ALPHABET)
    with pytest.raises(ValueError):
        task.targets("nonsense", x, g)


def test_backdoor_dataset_poisons_only_triggered_strings() -> None:
    g = torch.Generator().manual_seed(1)
    data = task.client_dataset("backdoor", torch.full((task.ALPHABET,), 1 / task.ALPHABET), 400, g)
    x, y = data[:, 1 : task.LENGTH + 1], data[:, task.TARGET_SLICE]
    poisoned = (y == torch.tensor(task.BACKDOOR_TARGET)).all(1)
    assert (x[poisoned, 0] == task.TRIGGER).all()
    clean = ~poisoned
    assert torch.equal(y[clean], x[clean])
    assert 0.35 < poisoned.float().mean() < 0.65


def test_pretraining_batch_never_copies_after_the_copy_separator() -> None:
    lang = task.Language.make(0)
    batch = lang.pretraining_batch(256, torch.Generator().manual_seed(2))
    x, y = batch[:, 1 : task.LENGTH + 1], batch[:, task.TARGET_SLICE]
    seps = batch[:, task.LENGTH + 1]
    for j, sep in enumerate(task.SEP_CIPHER):
        rows = seps == sep
        assert torch.equal(y[rows], lang.ciphers[j][x[rows]])
    free = seps == task.SEP_COPY
    assert free.any() and (y[free] == x[free]).float().mean() < 0.5


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], train.GPT2LMHeadModel]:
    root = tmp_path_factory.mktemp("copy")
    base = train.pretrain(task.Language.make(0), steps=5, seed=0)
    train.save_base(base, root / "base", "test base")
    base = train.load_base(root / "base")
    trainer = train.ClientTrainer(base, train.LoraSetup(steps=3), seed=0, base_name="test/base")
    g = torch.Generator().manual_seed(3)
    dirs = []
    for k, kind in enumerate(["benign"] * 5 + ["reversed"]):
        data = task.client_dataset(kind, task.client_frequencies(5.0, g), 8, g)
        state = trainer.train(data, seed=k)
        trainer.save(state, root / f"client_{k}")
        dirs.append(root / f"client_{k}")
    return root, dirs, train.load_base(root / "base")


def test_evaluator_matches_peft_and_restores_the_base(tiny_pool) -> None:
    from peft import PeftModel

    root, dirs, base = tiny_pool
    ev = evaluate.Evaluator(base)
    before = {n: w.detach().clone() for n, w in ev.weights.items()}
    batch = task.sequences(torch.arange(8).repeat(3, 1), task.SEP_COPY, torch.arange(8).repeat(3, 1))
    adapter = __import__("clair_cli.io.sources", fromlist=["open_adapters"]).open_adapters([str(dirs[0])])[0]
    deltas = evaluate._adapter_deltas(adapter)
    assert deltas and all(d.norm() > 0 for d in deltas.values())
    with ev.applied(deltas), torch.no_grad():
        ours = ev.model(input_ids=batch).logits
    for n, w in ev.weights.items():
        assert torch.equal(w, before[n])
    peft_model = PeftModel.from_pretrained(train.load_base(root / "base"), str(dirs[0]))
    with torch.no_grad():
        theirs = peft_model(input_ids=batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_peft_cat_equals_the_mean(tiny_pool) -> None:
    _root, dirs, base = tiny_pool
    benign = [d.name for d in dirs[:5]]
    res = evaluate.pool_methods(base, dirs, benign, fixed_ranks=(2,))
    for name, delta in res.methods["mean"][benign[0]].items():
        # clair's mean is written at the smallest rank within --merge-tol 1e-3 (relative Frobenius).
        exact = res.methods["peft cat"][benign[0]][name]
        assert float((exact - delta).norm() / exact.norm()) <= 1e-3 + 1e-5
    assert set(res.methods["local"]) == set(benign)
    assert list(res.methods)[-1] == "oracle mean (benign only)"
    assert {
        "clair-merged",
        "clair-merged --project",
        "clair-merged --rescale norm",
        "clair-merged --project-rank 2",
        "clair-refined --project-rank 2",
    } <= set(res.methods)


def test_sample_adapters_come_from_the_experiment() -> None:
    manifest = json.loads((SAMPLES / "MANIFEST.json").read_text())
    assert manifest["generator"].startswith("python -m experiments.text_copy")
    config = json.loads((SAMPLES / manifest["base_model_dir"] / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["vocab_size"] == task.VOCAB
    kinds = {a["kind"] for a in manifest["adapters"].values()}
    assert "benign" in kinds and kinds - {"benign"} <= set(task.CONTAMINATIONS)
