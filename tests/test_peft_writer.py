"""What clair writes loads in PEFT as computed: every config feature, checked by loading.

Each case trains nothing: PEFT builds adapters with random factors on a tiny model whose
module names are suffixes of each other (``proj``, ``z.proj``, ``y.z.proj``, ``x.proj``,
``zxproj``), ``clair merge --method mean --merge-tol 0`` merges them, and PEFT loads the
result on a fresh model; every module's ``get_delta_weight`` must equal the mean of the
inputs' own (as PEFT loads them), and no other module may be adapted.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import lora_config, random_factors, tiny_llama, write_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from clair_cli import pipeline
from clair_cli.cli import app
from clair_cli.io.lora_config import exact_key, exact_targets, peft_selects
from clair_cli.params import AuditParams
from clair_cli.results import MergeOptions


class Z(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)


class Y(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.z = Z()


class Suffixes(nn.Module):
    """Module names that are dotted suffixes (and near-misses) of each other, and every layer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.z = Z()
        self.x = Z()
        self.y = Y()
        self.zxproj = nn.Linear(8, 6)
        self.embed = nn.Embedding(11, 8)
        self.conv1 = nn.Conv1d(3, 5, 3)
        self.conv2 = nn.Conv2d(3, 5, 3)
        self.c_attn = Conv1D(12, 8)
        self.head = nn.Linear(6, 4)


def suffixes() -> Suffixes:
    torch.manual_seed(0)
    return Suffixes().eval()


ALL = ["proj", "embed", "conv1", "conv2", "c_attn", "zxproj"]
# Per case: the LoraConfig of every input (their ranks differ by module, so the merged
# adapter needs rank_pattern entries for names that are suffixes of others), and the
# clair flags the case needs.
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "suffix rank_pattern": (dict(target_modules=["proj"], rank_pattern={r"^z\.proj": 1, "^proj": 3}), []),
    "suffix alpha_pattern": (
        dict(target_modules=["proj", "zxproj"], alpha_pattern={r"^y\.z\.proj": 3, "^zxproj": 32}),
        [],
    ),
    "regex target_modules": (dict(target_modules=r"z\.proj|proj|embed", rank_pattern={r"^z\.proj": 1}), []),
    "embedding and convolutions": (dict(target_modules=["embed", "conv1", "conv2"], rank_pattern={"conv2": 1}), []),
    "Conv1D (fan_in_fan_out)": (dict(target_modules=["c_attn", "proj"], fan_in_fan_out=True), []),
    "rslora with patterns": (
        dict(target_modules=ALL, use_rslora=True, rank_pattern={r"^x\.proj": 1}, alpha_pattern={"embed": 4}),
        [],
    ),
    "modules_to_save (dropped)": (dict(target_modules=["proj"], modules_to_save=["head"]), ["--drop-extras"]),
    "bias all (dropped)": (dict(target_modules=["proj", "conv1"], bias="all"), ["--drop-extras"]),
}
K = 3


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def lora_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA layer's update as PEFT computes it, by module name."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.scaling:
            out[name.removeprefix("base_model.model.")] = layer.get_delta_weight("default").detach().double()
    return out


def load(base: nn.Module, directory: Path) -> PeftModel:
    """PEFT's own load; a missing or unexpected key (a tensor PEFT ignores) fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(directory))
    bad = [str(w.message) for w in caught if re.search("missing|unexpected", str(w.message), re.I)]
    assert not bad, bad
    return model


def make_inputs(root: Path, build, kw: dict[str, Any], k: int = K) -> list[dict[str, torch.Tensor]]:
    """``k`` PEFT adapters saved under ``root/a<k>``; returns their deltas as PEFT computes them."""
    deltas = []
    for i in range(k):
        base = build()
        torch.manual_seed(100 + i)  # after build(), which seeds the base weights
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw))
        if kw.get("bias", "none") != "none" or kw.get("modules_to_save"):
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.1)
        model.save_pretrained(root / f"a{i}")
        deltas.append(lora_deltas(model))
    return deltas


def assert_loads_as_mean(out: Path, build, deltas: list[dict[str, torch.Tensor]], tol: float = 1e-5) -> dict:
    model = load(build(), out)
    got = lora_deltas(model)
    want = {m: sum(d[m] for d in deltas) / len(deltas) for m in deltas[0]}
    assert set(got) == set(want), "PEFT adapts other modules than those merged"
    for m, w in want.items():
        assert got[m].shape == w.shape, m
        rel = float((got[m] - w).norm() / w.norm())
        assert rel < tol, (m, rel)
    return json.loads((out / "adapter_config.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_merged_adapter_loads_in_peft_as_computed(case: str, tmp_path: Path) -> None:
    kw, flags = CASES[case]
    deltas = make_inputs(tmp_path / "pool", suffixes, kw)
    out = tmp_path / "merged"
    result = invoke("merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--merge-tol", "0", *flags)
    assert result.exit_code == 0, result.output
    cfg = assert_loads_as_mean(out, suffixes, deltas)
    assert cfg["bias"] == "none" and cfg["modules_to_save"] is None and cfg["use_rslora"] is False
    for key in [*cfg["rank_pattern"], *cfg["alpha_pattern"]]:
        assert key.startswith("^"), key  # anchored: PEFT's (.*\.)? prefix cannot match


def test_rank_pattern_of_a_suffix_name_is_exact(tmp_path: Path) -> None:
    deltas = make_inputs(tmp_path / "pool", suffixes, CASES["suffix rank_pattern"][0])
    out = tmp_path / "m"
    assert (
        invoke("merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--merge-tol", "0").exit_code
        == 0
    )
    cfg = assert_loads_as_mean(out, suffixes, deltas)
    # z.proj: 3 inputs of rank 1; proj: rank 3 each (capped at 6); the others rank 2 each.
    assert cfg["r"] == 6 and cfg["rank_pattern"] == {r"^z\.proj": 3}
    assert cfg["target_modules"] == ["proj"]  # the inputs' own list: it selects exactly these modules


def test_regex_target_that_ignores_tensors_is_reported_and_the_merge_targets_them(tmp_path: Path) -> None:
    deltas = make_inputs(tmp_path / "pool", suffixes, dict(target_modules=["proj"]))
    for i in range(K):  # each input's config now leaves x.proj and y.z.proj out; their files hold them
        path = tmp_path / "pool" / f"a{i}" / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg["target_modules"] = r"z\.proj|proj"
        path.write_text(json.dumps(cfg))
    out = tmp_path / "m"
    result = invoke("merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--merge-tol", "0")
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "PEFT ignores them when loading those inputs" in card and "PEFT ignores them" in result.output
    cfg = assert_loads_as_mean(out, suffixes, deltas)  # loads as computed: all four modules
    assert re.fullmatch(cfg["target_modules"], "y.z.proj") and not re.fullmatch(cfg["target_modules"], "zxproj")
    inspect = invoke("inspect", str(tmp_path / "pool" / "a0"), "--json", "-")
    assert "PEFT ignores those tensors" in inspect.output


def test_layer_replication_is_kept(tmp_path: Path) -> None:
    kw = dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]])
    deltas = make_inputs(tmp_path / "pool", tiny_llama, kw)
    assert any(".layers.2." in m for m in deltas[0])  # the replicated layer has its own factors
    out = tmp_path / "m"
    assert (
        invoke("merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--merge-tol", "0").exit_code
        == 0
    )
    cfg = assert_loads_as_mean(out, tiny_llama, deltas)
    assert cfg["layer_replication"] == [[0, 2], [1, 2]]


def test_different_layer_replication_is_refused(tmp_path: Path) -> None:
    make_inputs(tmp_path / "pool", tiny_llama, dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]))
    path = tmp_path / "pool" / "a1" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["layer_replication"] = [[0, 1], [0, 2]]
    path.write_text(json.dumps(cfg))
    result = invoke("merge", str(tmp_path / "pool"), "--out", str(tmp_path / "m"), "--method", "mean")
    assert result.exit_code == 2
    assert "layer_replication" in result.output and "adapter_config.json" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "field,value",
    [
        ("alora_invocation_tokens", [5, 6]),
        ("use_qalora", True),
        ("target_parameters", ["mlp.experts.down_proj"]),
        ("layer_replication", "0-2"),
    ],
)
def test_lora_variants_and_bad_replication_are_refused(tmp_path: Path, field: str, value: Any) -> None:
    for k in range(2):
        write_adapter(tmp_path / "pool" / f"a{k}", random_factors({"q_proj": (16, 12)}, seed=k), lora_config())
    path = tmp_path / "pool" / "a1" / "adapter_config.json"
    path.write_text(json.dumps(lora_config(**{field: value})))
    result = invoke("merge", str(tmp_path / "pool"), "--out", str(tmp_path / "m"), "--method", "mean")
    assert result.exit_code == 2
    first = result.output.strip().splitlines()[0]
    assert first.startswith("Error:") and "a1" in first and field in first, result.output
    assert not (tmp_path / "m").exists()


def test_merged_config_does_not_depend_on_the_order_of_the_sources(tmp_path: Path) -> None:
    modules = {"model.q_proj": (16, 12), "model.v_proj": (16, 12)}
    kinds = {
        "a": ("CAUSAL_LM", ["v_proj", "q_proj"]),
        "b": ("SEQ_CLS", ["q_proj", "v_proj"]),
        "c": ("CAUSAL_LM", ["model.q_proj", "v_proj"]),
    }
    for k, (task, targets) in enumerate(kinds.values()):
        cfg = lora_config(task_type=task, target_modules=targets)
        write_adapter(tmp_path / list(kinds)[k], random_factors(modules, seed=k), cfg)
    outs = []
    for order in (["a", "b", "c"], ["b", "c", "a"]):
        out = tmp_path / "".join(order)
        result = invoke("merge", *(str(tmp_path / n) for n in order), "--out", str(out), "--method", "mean")
        assert result.exit_code == 0, result.output
        assert "task_type values differ (CAUSAL_LM, SEQ_CLS)" in result.output
        assert "task\\_type values differ" in (out / "README.md").read_text()
        outs.append(out)
    a, b = ((o / "adapter_config.json").read_bytes() for o in outs)
    assert a == b
    cfg = json.loads(a)
    assert cfg["task_type"] is None and cfg["target_modules"] == ["model.q_proj", "q_proj", "v_proj"]
    assert (outs[0] / "adapter_model.safetensors").read_bytes() == (outs[1] / "adapter_model.safetensors").read_bytes()


def test_bare_file_refined_config_gives_every_module_its_rank(tmp_path: Path) -> None:
    from clair_cli.io import SourceOptions, open_adapters
    from clair_cli.io.peft_writer import source_config

    torch.manual_seed(0)
    peft = get_peft_model(
        suffixes(),
        LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], rank_pattern={r"^z\.proj": 1}, init_lora_weights=False),
    )
    peft.save_pretrained(tmp_path / "src")
    bare = tmp_path / "bare.safetensors"
    shutil.copy(tmp_path / "src" / "adapter_model.safetensors", bare)
    (adapter,) = open_adapters([str(bare)], SourceOptions(lora_alpha=4))
    cfg = source_config(adapter)
    assert cfg["rank_pattern"] == {r"^z\.proj": 1}
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copy(bare, out / "adapter_model.safetensors")
    got = lora_deltas(load(suffixes(), out))
    want = lora_deltas(peft)
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m])


NAMES = ["proj", "z.proj", "x.proj", "y.z.proj", "zxproj", "a-b.c+d", "layers.1.q_proj", "layers.11.q_proj"]


@pytest.mark.parametrize("name", NAMES)
def test_exact_keys_match_one_module_in_peft(name: str) -> None:
    for other in NAMES:
        assert (get_pattern_key([exact_key(name)], other) == exact_key(name)) == (other == name), other
    target = exact_targets([name, "zxproj"])
    for other in NAMES:
        assert bool(check_target_module_exists(LoraConfig(target_modules=target), other)) == (other in (name, "zxproj"))


TARGET_CONFIGS = [
    {"target_modules": ["proj"]},
    {"target_modules": ["z.proj", "zxproj"]},
    {"target_modules": r".*\.proj"},
    {"target_modules": ["q_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 11, "layers_pattern": "layers"},
    {"target_modules": ["proj"], "exclude_modules": ["y.z.proj"]},
    {"target_modules": ["proj"], "modules_to_save": ["z"]},
]


@pytest.mark.parametrize("raw", TARGET_CONFIGS, ids=str)
def test_peft_selects_is_peft_s_rule(raw: dict[str, Any]) -> None:
    cfg = LoraConfig(**raw)
    for name in NAMES:
        assert peft_selects(raw, name) == bool(check_target_module_exists(cfg, name)), name


@pytest.mark.parametrize("shorthand", ["all-linear", "ALL-LINEAR", "All-Linear"])
def test_peft_s_all_linear_shorthand_is_read_in_any_case(shorthand: str) -> None:
    """PEFT lower-cases a string target_modules before comparing it with its shorthand: which
    modules that selects depends on the model, not on the config (found by review: "ALL-LINEAR"
    was taken for a regular expression that selects nothing, and a false note followed)."""
    assert all(peft_selects({"target_modules": shorthand}, name) is None for name in NAMES)


def decaying_pool(K: int = 24, r: int = 8, d: int = 256) -> tuple[pipeline.Pool, dict]:
    """24 adapters of rank 8 whose updates span six decades: summed rank 192, float32 cannot resolve it."""
    ads = {}
    for k in range(K):
        g = torch.Generator().manual_seed(k)
        ads[f"a{k:02d}"] = {"m": (torch.randn(r, d, generator=g), torch.randn(d, r, generator=g) * 10 ** (-k / 4), 1.0)}
    return pipeline.pool_from_factors(ads, "base", method="mean"), ads


@pytest.mark.parametrize("tol", [0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
def test_merge_tol_is_honoured_and_the_error_is_measured(tol: float) -> None:
    from clair_cli.core.lowrank import rank_for_tolerance

    pool, ads = decaying_pool()
    merged = pipeline.merge(pool, "mean", AuditParams(), options=MergeOptions(tol=tol))
    res = merged.modules["m"]
    exact = sum(s * (B.double() @ A.double()) for A, B, s in (f["m"] for f in ads.values())) / len(ads)
    measured = float((res.B.double() @ res.A.double() - exact).norm() / exact.norm())
    assert res.A.dtype == torch.float32
    assert measured == pytest.approx(res.info["truncation_error"], rel=1e-3, abs=1e-9)
    if tol >= 1e-7:
        assert measured <= tol
        assert res.rank <= rank_for_tolerance(torch.linalg.svdvals(exact), tol) + 2  # the smallest, to rounding
    else:
        assert res.rank == 192  # nothing dropped; the error left is float32's rounding
    assert merged.summary()["max_relative_error"] == pytest.approx(res.info["truncation_error"], rel=1e-5)


def test_card_states_the_measured_error_and_a_tolerance_float32_cannot_reach(tmp_path: Path) -> None:
    for k in range(3):
        write_adapter(tmp_path / "pool" / f"a{k}", seed=k)
    out = tmp_path / "m"
    assert (
        invoke("merge", str(tmp_path / "pool"), "--out", str(out), "--method", "mean", "--merge-tol", "0").exit_code
        == 0
    )
    card = (out / "README.md").read_text()
    line = next(x for x in card.splitlines() if "(measured)" in x)
    assert "above --merge-tol" in line and "0.00e+00" not in line


def test_intersect_targets_only_the_merged_modules(tmp_path: Path) -> None:
    both = {"model.q_proj": (16, 12), "model.v_proj": (16, 12)}
    write_adapter(tmp_path / "a", random_factors(both, seed=1), lora_config(target_modules=["q_proj", "v_proj"]))
    write_adapter(
        tmp_path / "b", random_factors({"model.q_proj": (16, 12)}, seed=2), lora_config(target_modules=["q_proj"])
    )
    out = tmp_path / "m"
    result = invoke(
        "merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--method", "mean", "--intersect"
    )
    assert result.exit_code == 0, result.output
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert (
        isinstance(targets, str) and re.fullmatch(targets, "model.q_proj") and not re.fullmatch(targets, "model.v_proj")
    )


def test_the_io_layer_does_no_arithmetic() -> None:
    import ast

    root = Path(__file__).parents[1] / "clair_cli" / "io"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("clair_cli.core"), path.name
