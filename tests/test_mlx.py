"""MLX-LM LoRA adapters (``mlx_lm.lora``): audited, merged and refined in their own layout as the
same adapters in PEFT's layout are, and the conversion script (``examples/mlx_to_peft.py``) gives a
PEFT adapter whose update, as clair reads it and as PEFT applies it, is MLX-LM's
``scale * (lora_a @ lora_b)^T``."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke_cli, tiny_llama
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
MODULES = [f"model.layers.{layer}.self_attn.{p}" for layer in (0, 1) for p in ("q_proj", "v_proj")]
RANK, SCALE, WIDTH = 4, 20.0, 16


def mlx_adapter(directory: Path, seed: int, fine_tune_type: str = "lora") -> dict[str, torch.Tensor]:
    """An MLX-LM adapter directory of the tiny Llama's shapes; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in MODULES:
        tensors[f"{m}.lora_a"] = torch.randn(WIDTH, RANK, generator=g) * 0.1
        tensors[f"{m}.lora_b"] = torch.randn(RANK, WIDTH, generator=g) * 0.01
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapters.safetensors"))
    config = {
        "model": "mlx-community/tiny-llama",
        "fine_tune_type": fine_tune_type,
        "num_layers": 2,
        "lora_parameters": {"rank": RANK, "scale": SCALE, "dropout": 0.0},
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def converter():
    spec = importlib.util.spec_from_file_location("mlx_to_peft", ROOT / "examples" / "mlx_to_peft.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert


def mlx_update(directory: Path) -> dict[str, np.ndarray]:
    """Each module's update as MLX-LM applies the adapter in ``directory`` (``LoRALinear.fuse``:
    ``scale * lora_b^T @ lora_a^T``), after the checks of ``mlx_lm.tuner.utils.load_adapters``: a
    plain LoRA, every tensor a ``lora_a`` (``in x rank``) or ``lora_b`` (``rank x out``) at the
    config's one rank."""
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    assert config.get("fine_tune_type", "lora") == "lora"
    rank, scale = config["lora_parameters"]["rank"], config["lora_parameters"]["scale"]
    tensors = load_file(str(directory / "adapters.safetensors"))
    out = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".")
        assert part in ("lora_a", "lora_b"), key
        if part == "lora_a":
            b = tensors[f"{module}.lora_b"]
            assert t.shape[1] == rank and b.shape[0] == rank, (key, t.shape, b.shape)
            out[module] = (scale * b.double().T @ t.double().T).numpy()
    return out


def peft_update(directory: Path) -> dict[str, np.ndarray]:
    """Each module's update as clair reads a PEFT adapter directory (``scale * B @ A``)."""
    from clair_cli.io.sources import SourceOptions, open_adapters

    (adapter,) = open_adapters([str(directory)], SourceOptions())
    return {m.name: (m.scale * m.B.double() @ m.A.double()).numpy() for m in adapter.load(dtype=torch.float64)}


def pools(tmp_path: Path, n: int = 6) -> tuple[Path, Path]:
    """``n`` MLX-LM adapters and the same adapters converted to PEFT (``examples/mlx_to_peft.py``);
    the last two push one shared direction tenfold in layer 1's q_proj."""
    convert = converter()
    for k in range(n):
        tensors = mlx_adapter(tmp_path / "mlx" / f"c{k}", k)
        if k >= n - 2:
            g = torch.Generator().manual_seed(99)
            m = "model.layers.1.self_attn.q_proj"
            tensors[f"{m}.lora_a"][:, 0] = torch.randn(WIDTH, generator=g)
            tensors[f"{m}.lora_b"][0] = torch.randn(WIDTH, generator=g)
            save_file(tensors, str(tmp_path / "mlx" / f"c{k}" / "adapters.safetensors"))
        convert(tmp_path / "mlx" / f"c{k}", tmp_path / "peft" / f"c{k}")
    return tmp_path / "mlx", tmp_path / "peft"


def test_an_mlx_pool_is_audited_as_the_same_adapters_in_peft_layout(tmp_path: Path) -> None:
    mlx, peft = pools(tmp_path)
    reports = []
    for pool in (mlx, peft):
        proc = invoke_cli("audit", str(pool), "--json", "-", "--exit-zero", "-q")
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    got, want = ([(a["name"], a["flagged"], a["score"]) for a in r["adapters"]] for r in reports)
    assert got == want
    assert any(flagged for _, flagged, _ in got)
    assert "MLX-LM LoRA files: merged and refined adapters are written in the same layout" in reports[0]["notes"]
    proc = invoke_cli("inspect", str(mlx / "c0"), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["layout"] == "mlx" and adapter["lora_alpha"] == pytest.approx(SCALE * RANK)
    # The update clair reads is MLX-LM's, module by module.
    from clair_cli.io.sources import SourceOptions, open_adapters

    (opened,) = open_adapters([str(mlx / "c0")], SourceOptions())
    read = {m.name: (m.scale * m.B.double() @ m.A.double()).numpy() for m in opened.load(dtype=torch.float64)}
    expected = mlx_update(mlx / "c0")
    assert sorted(read) == sorted(expected) == sorted(MODULES)
    for m in MODULES:
        np.testing.assert_allclose(read[m], expected[m], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("command", ["merge", "refine"])
def test_merged_and_refined_mlx_adapters_keep_the_layout_and_the_peft_layouts_update(
    tmp_path: Path, command: str
) -> None:
    mlx, peft = pools(tmp_path)
    for pool, out in ((mlx, "out-mlx"), (peft, "out-peft")):
        proc = invoke_cli(command, str(pool), "--out", str(tmp_path / out), "-q")
        assert proc.returncode in (0, 1), proc.stderr
    outputs = [("", tmp_path / "out-mlx", tmp_path / "out-peft")]
    if command == "refine":
        outputs = [(d.name, d, tmp_path / "out-peft" / d.name) for d in sorted((tmp_path / "out-mlx").iterdir())]
        assert len(outputs) >= 4
    for name, got_dir, want_dir in outputs:
        assert sorted(p.name for p in got_dir.iterdir()) == ["README.md", "adapter_config.json", "adapters.safetensors"]
        assert "library_name: mlx" in (got_dir / "README.md").read_text()
        config = json.loads((got_dir / "adapter_config.json").read_text())
        source = json.loads((mlx / (name or "c0") / "adapter_config.json").read_text())
        if command == "refine":
            assert config == source
        else:
            assert config["lora_parameters"]["scale"] == 1.0 and config["num_layers"] == source["num_layers"]
        got, want = mlx_update(got_dir), peft_update(want_dir)
        assert sorted(got) == sorted(want) == sorted(MODULES)
        for m in MODULES:
            np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-7 * np.abs(want[m]).max())


def test_what_is_not_an_mlx_lm_plain_lora_is_refused(tmp_path: Path) -> None:
    for k in range(5):
        mlx_adapter(tmp_path / "pool" / f"c{k}", k)
    # The weights file alone, without its config: no rank and scale.
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "pool" / "c0" / "adapters.safetensors", tmp_path / "alone" / "adapters.safetensors")
    proc = invoke_cli("inspect", str(tmp_path / "alone" / "adapters.safetensors"))
    assert proc.returncode == 2 and "without its adapter_config.json" in proc.stderr, proc.stderr
    (tmp_path / "peft.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 8}))
    proc = invoke_cli(
        "inspect", str(tmp_path / "alone" / "adapters.safetensors"), "--config", str(tmp_path / "peft.json")
    )
    assert proc.returncode == 2 and "a PEFT adapter config (peft_type) given for MLX-LM's" in proc.stderr, proc.stderr
    # MLX-LM's file and config, but not plain LoRA factors (mlx_lm's fused qkv LoRA of AFM models, an empty
    # file): said of the file (it read as a config that does not describe "the PEFT-layout weights file").
    for what, tensors in {
        "fused": {"model.layers.0.attn.qkv_proj.lora_a.0": torch.ones(WIDTH, RANK)},
        "empty": {},
    }.items():
        d = tmp_path / what
        d.mkdir()
        save_file(tensors, str(d / "adapters.safetensors"))
        shutil.copy(tmp_path / "pool" / "c0" / "adapter_config.json", d / "adapter_config.json")
        proc = invoke_cli("inspect", str(d))
        assert proc.returncode == 2, proc.stderr
        assert "adapters.safetensors: holds no MLX-LM LoRA factors" in proc.stderr.splitlines()[0], proc.stderr
        assert ("qkv_proj.lora_a.0" if tensors else "it holds no tensor") in proc.stderr, proc.stderr
    # A directory of one of mlx_lm.lora's checkpoints (--save-every) and the config: named, and read when named.
    d = tmp_path / "checkpoint"
    shutil.copytree(tmp_path / "pool" / "c0", d)
    (d / "adapters.safetensors").rename(d / "0000100_adapters.safetensors")
    proc = invoke_cli("inspect", str(d))
    assert proc.returncode == 2 and "or adapters.safetensors (MLX-LM's)" in proc.stderr, proc.stderr
    assert "For the MLX-LM checkpoint 0000100_adapters.safetensors, name the file itself" in proc.stderr
    assert invoke_cli("inspect", str(d / "0000100_adapters.safetensors"), "-q").returncode == 0
    cases = {
        "dora": ({"fine_tune_type": "dora"}, {}, "fine_tune_type 'dora': DoRA"),
        "full": ({"fine_tune_type": "full"}, {}, "a full fine-tune"),
        "no lora_parameters": ({"lora_parameters": None}, {}, "without lora_parameters"),
        "rank": ({"lora_parameters": {"rank": 0, "scale": 2.0}}, {}, "rank must be a positive integer"),
        "scale": ({"lora_parameters": {"rank": RANK, "scale": "x"}}, {}, "scale must be a finite number"),
        "magnitude": ({}, {"model.layers.0.self_attn.q_proj.m": torch.ones(WIDTH)}, "a DoRA magnitude vector"),
        "experts": ({}, {"model.layers.0.mlp.switch_mlp.up_proj.lora_a": torch.ones(2, RANK, WIDTH)}, "MoE expert"),
        "rank mismatch": (
            {"lora_parameters": {"rank": 8, "scale": 2.0}},
            {},
            "but the config gives rank 8 (adapter_config.json: lora_parameters.rank",
        ),
        "fine_tune_type list": ({"fine_tune_type": ["lora"]}, {}, "fine_tune_type ['lora']: not a LoRA"),
        "fine_tune_type object": ({"fine_tune_type": {"a": 1}}, {}, "fine_tune_type {'a': 1}: not a LoRA"),
        "use_dora": ({"fine_tune_type": None, "use_dora": True}, {}, "use_dora: a DoRA adapter"),
        "b alone": (
            {},
            {"model.layers.5.self_attn.q_proj.lora_b": torch.ones(RANK, WIDTH)},
            "has lora_b but no lora_a",
        ),
        "unpaired": ({}, {"model.layers.0.mlp.up_proj.lora_a": torch.ones(WIDTH, RANK)}, "has lora_a but no lora_b"),
        "pair": ({}, {f"{MODULES[0]}.lora_b": torch.ones(RANK + 1, WIDTH)}, "rank mismatch: lora_a [16, 4] has rank 4"),
        # A PEFT config with MLX-LM's tensors: said so (it was "an MLX-LM adapter config without lora_parameters").
        "peft config": (
            {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            {},
            "a PEFT adapter config (peft_type) given for MLX-LM's LoRA tensors",
        ),
    }
    for what, (config_change, extra, message) in cases.items():
        d = tmp_path / what.replace(" ", "-")
        tensors = mlx_adapter(d, 0)
        config = json.loads((d / "adapter_config.json").read_text()) | config_change
        config = {k: v for k, v in config.items() if not (k == "fine_tune_type" and v is None and what == "use_dora")}
        (d / "adapter_config.json").write_text(json.dumps(config))
        if extra:
            save_file({**tensors, **extra}, str(d / "adapters.safetensors"))
        if "peft_type" in config:  # the tensors under PEFT's file name, beside the PEFT config
            (d / "adapters.safetensors").rename(d / "adapter_model.safetensors")
        proc = invoke_cli("inspect", str(d))
        assert proc.returncode == 2, (what, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (what, proc.stderr)


def test_the_converted_adapter_is_mlx_lms_update_as_clair_reads_it_and_peft_applies_it(tmp_path: Path) -> None:
    from test_merge_review import peft_deltas

    from clair_cli.io.sources import SourceOptions, open_adapters

    tensors = mlx_adapter(tmp_path / "mlx", 0)
    converter()(tmp_path / "mlx", tmp_path / "peft")
    (adapter,) = open_adapters([str(tmp_path / "peft")], SourceOptions())
    read = {m.name: (m.scale * m.B.double() @ m.A.double()).numpy() for m in adapter.load(dtype=torch.float64)}
    applied = peft_deltas(tmp_path / "peft", lambda: tiny_llama(WIDTH))
    assert sorted(read) == sorted(applied) == sorted(MODULES)
    for m in MODULES:
        expected = (SCALE * (tensors[f"{m}.lora_a"].double() @ tensors[f"{m}.lora_b"].double()).T).numpy()
        np.testing.assert_allclose(read[m], expected, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(applied[m], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("what", ["dora", "experts"])
def test_the_converter_refuses_what_is_not_a_plain_lora(tmp_path: Path, what: str) -> None:
    tensors = mlx_adapter(tmp_path / "mlx", 0, fine_tune_type="dora" if what == "dora" else "lora")
    if what == "experts":  # an MoE expert stack (LoRASwitchLinear): 3-D factors
        tensors["model.layers.0.mlp.switch_mlp.gate_proj.lora_a"] = torch.zeros(4, RANK, WIDTH)
        save_file(tensors, str(tmp_path / "mlx" / "adapters.safetensors"))
    with pytest.raises(SystemExit, match="dora" if what == "dora" else "not a LoRA factor of a linear layer"):
        converter()(tmp_path / "mlx", tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()


def test_an_alpha_is_read_as_the_mlx_lm_version_that_wrote_the_config_applied_it(tmp_path: Path) -> None:
    """mlx_lm 0.6.0 to 0.14.1 applied ``scale * alpha / rank`` (configs of ``lora_layers``, and no
    ``use_dora`` before 0.13.1); 0.14.2 on ignored the ``alpha`` its defaults kept until 0.22
    (configs of ``num_layers`` from 0.19); a config of 0.13.1 to 0.18 does not say which."""
    params = {"rank": RANK, "alpha": 16, "scale": 10.0, "dropout": 0.0}
    cases = {
        "0.13.0": ({"lora_layers": 2, "lora_parameters": params}, 10.0 * 16 / RANK),
        "0.19": ({"num_layers": 2, "fine_tune_type": "lora", "lora_parameters": params}, 10.0),
        "alpha = rank": ({"lora_layers": 2, "use_dora": False, "lora_parameters": {**params, "alpha": RANK}}, 10.0),
        "0.16": ({"lora_layers": 2, "use_dora": False, "lora_parameters": params}, None),
        "alpha not a number": ({"lora_layers": 2, "lora_parameters": {**params, "alpha": "16"}}, None),
        # Each normal, their product not: read at scale 0 (a subnormal one is 0 to the commands), or infinite.
        "product zero": ({"lora_layers": 2, "lora_parameters": {**params, "alpha": 1e-200, "scale": 1e-200}}, None),
        "product subnormal": (
            {"lora_layers": 2, "lora_parameters": {**params, "alpha": 1e-160, "scale": 1e-160}},
            None,
        ),
        "product overflows": ({"lora_layers": 2, "lora_parameters": {**params, "alpha": 1e300, "scale": 1e300}}, None),
    }
    for what, (config, scale) in cases.items():
        d = tmp_path / what.replace(" ", "-")
        mlx_adapter(d, 0)
        (d / "adapter_config.json").write_text(json.dumps({"model": "m", **config}))
        proc = invoke_cli("inspect", str(d), "--json", "-")
        if scale is None:
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, (what, proc.stderr)
            assert "alpha" in proc.stderr.splitlines()[0], (what, proc.stderr)
            assert "adapter_config.json" in proc.stderr.splitlines()[0], (what, proc.stderr)
            continue
        assert proc.returncode == 0, (what, proc.stderr)
        (adapter,) = json.loads(proc.stdout)["adapters"]
        assert adapter["lora_alpha"] == pytest.approx(scale * RANK), what
    # A merge of 0.13.0's adapters: alpha = rank, so that mlx_lm 0.14.1 and older apply scale 1 too.
    for k in range(5):
        mlx_adapter(tmp_path / "pool" / f"c{k}", k)
        (tmp_path / "pool" / f"c{k}" / "adapter_config.json").write_text(json.dumps(cases["0.13.0"][0]))
    proc = invoke_cli("merge", str(tmp_path / "pool"), "--out", str(tmp_path / "out"), "-q")
    assert proc.returncode in (0, 1), proc.stderr
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    merged = written["lora_parameters"]
    assert merged["scale"] == 1.0 and merged["alpha"] == merged["rank"]
    # num_layers beside lora_layers: what mlx_lm 0.19 and later read.
    assert written["lora_layers"] == written["num_layers"] == 2
    reread = invoke_cli("inspect", str(tmp_path / "out"), "--json", "-")
    assert reread.returncode == 0, reread.stderr
    assert json.loads(reread.stdout)["adapters"][0]["lora_alpha"] == merged["rank"]


def test_an_mlx_lm_config_beside_a_peft_weights_file(tmp_path: Path) -> None:
    """A directory with both weights files is read as its config says (MLX-LM's: adapters.safetensors,
    what mlx_lm loads); an MLX-LM config is never read as PEFT's (PEFT's defaults for its rank and scale)."""
    mlx_adapter(tmp_path / "mlx", 0)
    converter()(tmp_path / "mlx", tmp_path / "peft")
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "mlx", both)
    shutil.copy(tmp_path / "peft" / "adapter_model.safetensors", both)
    proc = invoke_cli("inspect", str(both), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    (adapter,) = json.loads(proc.stdout)["adapters"]
    assert adapter["layout"] == "mlx" and adapter["lora_alpha"] == pytest.approx(SCALE * RANK)
    (both / "adapters.safetensors").unlink()
    for args in (
        [str(both)],
        [str(tmp_path / "peft" / "adapter_model.safetensors"), "--config", str(both / "adapter_config.json")],
    ):
        proc = invoke_cli("inspect", *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "adapter_config.json: an MLX-LM adapter config (lora_parameters)" in proc.stderr.splitlines()[0]
    # With PEFT's config, the directory is PEFT's adapter (what PEFT loads from it).
    shutil.copy(tmp_path / "mlx" / "adapters.safetensors", both)
    shutil.copy(tmp_path / "peft" / "adapter_config.json", both)
    proc = invoke_cli("inspect", str(both), "--json", "-")
    assert proc.returncode == 0 and json.loads(proc.stdout)["adapters"][0]["layout"] == "peft", proc.stderr


def test_a_pool_of_mlx_lm_and_peft_adapters_is_refused_with_the_converter(tmp_path: Path) -> None:
    mlx, peft = pools(tmp_path)
    shutil.copytree(peft / "c0", mlx / "p0")
    proc = invoke_cli("audit", str(mlx))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "c0 is an MLX-LM LoRA and p0 is a PEFT LoRA" in proc.stderr
    assert "examples/mlx_to_peft.py" in proc.stderr


def test_the_converter_writes_an_embeddings_lora_under_the_names_peft_applies(tmp_path: Path) -> None:
    """MLX-LM's LoRAEmbedding adds ``scale * lora_a @ lora_b`` to the table; PEFT applies the converted
    adapter's update there (it ignored lora_A.weight on an nn.Embedding), and clair reads the MLX-LM
    adapter and the converted one as one update."""
    from peft import PeftModel

    from clair_cli.io.sources import SourceOptions, open_adapters

    vocab = tiny_llama(WIDTH).model.embed_tokens.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    m = "model.embed_tokens"
    tensors = {
        f"{m}.lora_a": torch.randn(vocab, RANK, generator=g),
        f"{m}.lora_b": torch.randn(RANK, WIDTH, generator=g),
    }
    (tmp_path / "mlx").mkdir()
    save_file(tensors, str(tmp_path / "mlx" / "adapters.safetensors"))
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": RANK, "scale": 2.0}}
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(config))
    converter()(tmp_path / "mlx", tmp_path / "peft")
    base = tiny_llama(WIDTH)
    before = base.model.embed_tokens.weight.detach().clone()
    merged = PeftModel.from_pretrained(base, str(tmp_path / "peft")).merge_and_unload()
    applied = (merged.model.embed_tokens.weight.detach() - before).double()
    expected = 2.0 * tensors[f"{m}.lora_a"].double() @ tensors[f"{m}.lora_b"].double()
    np.testing.assert_allclose(applied.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    reads = []
    for d in ("mlx", "peft"):
        (adapter,) = open_adapters([str(tmp_path / d)], SourceOptions())
        (module,) = adapter.load(dtype=torch.float64)
        reads.append((module.scale * module.B.double() @ module.A.double()).numpy())
    np.testing.assert_allclose(reads[0], expected.numpy().T, rtol=1e-12)
    np.testing.assert_allclose(reads[1], expected.numpy().T, rtol=1e-12)


def test_an_mlx_lm_merge_is_streamed_and_padded_to_one_rank_as_in_memory(tmp_path: Path) -> None:
    """An MLX-LM merge was held in memory until written (every module takes one rank, known once all
    are merged). It is now streamed like the other layouts: modules staged at their own ranks, then
    copied padded with zero directions to the largest one, one module at a time. The file holds the
    tensors the in-memory layout gives (modules of different ranks, one rescaled in the second pass),
    and the staging file is gone."""
    from safetensors.torch import load_file

    from clair_cli.io.peft_writer import MLX_UNPADDED_NAME, MergedStream, merged_tensors
    from clair_cli.io.sources import SourceOptions, open_adapters

    mlx_adapter(tmp_path / "in", 0)
    (adapter,) = open_adapters([str(tmp_path / "in")], SourceOptions())
    g = torch.Generator().manual_seed(1)
    ranks = dict(zip(MODULES, (3, 7, 1, 5), strict=True))
    factors = {m: (torch.randn(r, WIDTH, generator=g), torch.randn(WIDTH, r, generator=g)) for m, r in ranks.items()}
    root = tmp_path / "out"
    with MergedStream(root, adapter.modules, {m: 8 for m in MODULES}, "mlx") as sink:
        for m in MODULES:
            sink.put(m, *factors[m])
        sink.rewrite_b(lambda B: B * 0.5)  # --rescale norm's second pass
    got = load_file(str(root / "adapters.safetensors"))
    want = merged_tensors(adapter.modules, {m: (A, B * 0.5) for m, (A, B) in factors.items()}, "mlx")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value.float()), key
    assert {tuple(t.shape) for k, t in got.items() if k.endswith("lora_a")} == {(WIDTH, 7)}
    assert not (root / MLX_UNPADDED_NAME).exists()


def mlx_loaded(directory: Path, n_layers: int = 2) -> set[str]:
    """The modules whose factors ``mlx_lm.load(BASE, adapter_path=directory)`` loads into a model of
    ``n_layers`` Llama layers (mlx_lm 0.22 to 0.31, ``tuner/utils.py``): ``linear_to_lora_layers`` gives
    a LoRA layer to each module of ``model.layers[-max(num_layers, 0):]`` whose name within its layer
    is in ``lora_parameters.keys`` (every linear one without keys) and to each module whose whole name
    is, and ``load_weights(..., strict=False)`` drops every other tensor of the file."""
    from safetensors import safe_open

    config = json.loads((directory / "adapter_config.json").read_text())
    keys = config["lora_parameters"].get("keys")
    within = keys if keys is not None else [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    layers = list(range(n_layers))[-max(config["num_layers"], 0) :]
    lora = {f"model.layers.{i}.{k}" for i in layers for k in within} | set(keys or [])
    with safe_open(str(directory / "adapters.safetensors"), "pt") as f:
        return {k.rpartition(".")[0] for k in f.keys()} & lora  # noqa: SIM118 (safe_open is not iterable)


def test_a_merge_writes_a_config_under_which_mlx_lm_loads_every_merged_module(tmp_path: Path) -> None:
    """The first source's config selects one of the four modules (num_layers 1, keys q_proj), the
    others' all of them: the merge's config must select them all, or mlx_lm drops three merged
    modules without a word (a review found the first source's num_layers and keys written as they were)."""
    mlx, _ = pools(tmp_path)
    config = json.loads((mlx / "c0" / "adapter_config.json").read_text())
    config["num_layers"] = 1
    config["lora_parameters"]["keys"] = ["self_attn.q_proj"]
    (mlx / "c0" / "adapter_config.json").write_text(json.dumps(config))
    assert mlx_loaded(mlx / "c0") == {"model.layers.1.self_attn.q_proj"}
    assert mlx_loaded(mlx / "c1") == set(MODULES)
    proc = invoke_cli("merge", str(mlx), "--out", str(tmp_path / "out"), "-q")
    assert proc.returncode in (0, 1), proc.stderr
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["num_layers"] == 2
    assert sorted(written["lora_parameters"]["keys"]) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert mlx_loaded(tmp_path / "out") == set(MODULES)


def test_modules_mlx_lm_does_not_load_under_the_adapters_own_config_are_noted(tmp_path: Path) -> None:
    """mlx_lm gives a LoRA to the modules its config's keys name in its last num_layers layers only, and
    loads the file with strict=False: the file's other modules are dropped without a word, and clair,
    which analyses them as stored, says so (as it says of PEFT modules a config does not select)."""
    mlx, _ = pools(tmp_path)
    proc = invoke_cli("inspect", str(mlx / "c0"), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    assert not [n for n in json.loads(proc.stdout)["adapters"][0]["notes"] if "mlx_lm.load drops" in n]
    config = json.loads((mlx / "c0" / "adapter_config.json").read_text())
    config["num_layers"] = 1
    config["lora_parameters"]["keys"] = ["self_attn.q_proj"]
    (mlx / "c0" / "adapter_config.json").write_text(json.dumps(config))
    assert mlx_loaded(mlx / "c0") == {"model.layers.1.self_attn.q_proj"}
    proc = invoke_cli("inspect", str(mlx / "c0"), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    (note,) = [n for n in json.loads(proc.stdout)["adapters"][0]["notes"] if "mlx_lm.load drops" in n]
    assert "keys does not name 2 module(s)" in note and "model.layers.0.self_attn.v_proj" in note
    assert "1 module(s) (e.g. model.layers.0.self_attn.q_proj) lie in layers below its last num_layers (1)" in note
    # A config of mlx_lm before 0.19 with lora_layers 0 (or below): model.layers[len - lora_layers:] holds no
    # layer, so that version loads none of the file's modules (an outside review found no note).
    del config["num_layers"], config["lora_parameters"]["keys"]
    config["lora_layers"] = 0
    (mlx / "c0" / "adapter_config.json").write_text(json.dumps(config))
    proc = invoke_cli("inspect", str(mlx / "c0"), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    (note,) = [n for n in json.loads(proc.stdout)["adapters"][0]["notes"] if "mlx_lm.load drops" in n]
    assert "4 module(s)" in note and "below its last num_layers (0)" in note
