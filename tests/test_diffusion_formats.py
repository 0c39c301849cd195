"""Diffusion LoRA files (kohya / sd-scripts and diffusers layouts): read as the updates diffusers
applies, audited like PEFT adapters, and written back in their own layout so that diffusers'
``load_lora_weights`` loads the merged and refined files as clair computed them.

A tiny UNet2DConditionModel and CLIP text encoder are built from configs (no network); the pools
are random factors on their layers, saved as kohya files (sd-scripts' names: the module path with
``.`` -> ``_`` after ``lora_unet_`` / ``lora_te_``) and by diffusers' own ``save_lora_weights``.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import diffusers  # noqa: F401 - the dev extra installs it (tests run in CI, never skipped)
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clair_cli.cli import app
from clair_cli.errors import AdapterFormatError
from clair_cli.io.sources import SourceOptions, open_adapter, resolve_sources

K, RANK, BOOSTED = 8, 4, 5
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1")
TE_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1")


def _quiet() -> None:
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# SDXL's UNet: added time and text conditioning (8 * 6 time features + text_encoder_2's projection of 8).
SDXL_UNET = {
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 56,
}


def tiny_pipeline(xl: bool = False):
    """A StableDiffusion(XL)Pipeline of tiny components built from configs (seed 0, no tokenizer)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _quiet()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 if xl else 8,
        norm_num_groups=2,
        **(SDXL_UNET if xl else {}),
    )
    te = {"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "vocab_size": 1000}
    text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=1 if xl else 2, **te))
    vae = AutoencoderKL(
        block_out_channels=(4,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=2,
    )
    if xl:
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=1, projection_dim=8, **te))
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=DDIMScheduler(clip_sample=False),
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``{module path: weight shape}`` of the Linear / Conv2d layers named by ``suffixes``."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and any(
            name == s or name.endswith("." + s) for s in suffixes
        ):
            out[name] = tuple(mod.weight.shape)
    return out


@pytest.fixture(scope="module")
def layers() -> dict[str, dict[str, tuple[int, ...]]]:
    return layers_of(tiny_pipeline())


def _parts(pipe) -> dict[str, torch.nn.Module]:
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def layers_of(pipe) -> dict[str, dict[str, tuple[int, ...]]]:
    """The layers the LoRAs adapt, by component."""
    return {c: _targets(m, UNET_TARGETS if c == "unet" else TE_TARGETS) for c, m in _parts(pipe).items()}


def _factors(shape: tuple[int, ...], shared: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x c_in [x kh x kw]) and B (c_out x r [x 1 x 1]) with B's columns near ``shared``'s span."""
    a = torch.randn(RANK, *shape[1:], generator=g) / 4
    b = shared @ torch.randn(shared.shape[1], RANK, generator=g) + 0.02 * torch.randn(shape[0], RANK, generator=g)
    return a, b.reshape(shape[0], RANK, *([1] * (len(shape) - 2)))


def pool_factors(layers: dict[str, dict[str, tuple[int, ...]]], seed: int = 0) -> list[dict[str, tuple]]:
    """K adapters' ``{component.module: (A, B)}``: benign ones share a rank-2 column space per module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"{c}.{m}": s for c, mods in layers.items() for m, s in mods.items()}
    shared = {m: torch.linalg.qr(torch.randn(s[0], 2, generator=g))[0] for m, s in shapes.items()}
    return [{m: _factors(s, shared[m], g) for m, s in shapes.items()} for _ in range(K)]


def kohya_name(module: str, xl: bool = False) -> str:
    """sd-scripts' name of a diffusers module path (``unet.a.b`` -> ``lora_unet_a_b``; SDXL's text
    encoders are ``lora_te1_`` and ``lora_te2_``)."""
    component, _, path = module.partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    return prefix[component] + path.replace(".", "_")


def alpha_of(k: int) -> float:
    """Adapter k's alpha: varied, and tenfold for the boosted one (its update is 10x)."""
    return RANK * (10.0 if k == BOOSTED else (1.0, 2.0, 0.5)[k % 3])


def write_kohya(path: Path, factors: dict[str, tuple], alpha: float, with_alpha: bool = True) -> Path:
    tensors = {}
    xl = any(m.startswith("text_encoder_2.") for m in factors)
    for module, (a, b) in factors.items():
        name = kohya_name(module, xl)
        tensors[f"{name}.lora_down.weight"] = a.contiguous()
        tensors[f"{name}.lora_up.weight"] = b.contiguous()
        if with_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_diffusers(directory: Path, factors: dict[str, tuple], alpha: float | None) -> Path:
    """``save_lora_weights`` of diffusers itself; alphas in its metadata when ``alpha`` is given."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig

    layers: dict[str, dict[str, torch.Tensor]] = {}
    for module, (a, b) in factors.items():
        component, _, path = module.partition(".")
        layers.setdefault(component, {})[f"{path}.lora_A.weight"] = a.contiguous()
        layers[component][f"{path}.lora_B.weight"] = b.contiguous()
    kwargs: dict[str, dict] = {f"{c}_lora_layers": tensors for c, tensors in layers.items()}
    if alpha is not None:
        for component in layers:
            targets = UNET_TARGETS if component == "unet" else TE_TARGETS
            config = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=list(targets)).to_dict()
            kwargs[f"{component}_lora_adapter_metadata"] = config
    pipeline = StableDiffusionXLPipeline if "text_encoder_2" in layers else StableDiffusionPipeline
    pipeline.save_lora_weights(directory, safe_serialization=True, **kwargs)
    return directory


@pytest.fixture(scope="module")
def kohya_pool(layers, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kohya")
    for k, factors in enumerate(pool_factors(layers)):
        write_kohya(root / f"style_{k}.safetensors", factors, alpha_of(k))
    return root


@pytest.fixture(scope="module")
def diffusers_pool(layers, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusers")
    for k, factors in enumerate(pool_factors(layers, seed=1)):
        # Odd adapters carry their alphas in the metadata; even ones have none (scale 1).
        write_diffusers(root / f"lora_{k}", factors, alpha_of(k) if k % 2 or k == BOOSTED else None)
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120"})


def fused_deltas(source: Path, xl: bool = False) -> dict[str, torch.Tensor]:
    """What diffusers adds to each weight when it loads and fuses the LoRA at ``source``
    (a directory or a file), by ``component.module``."""
    pipe = tiny_pipeline(xl)
    parts = _parts(pipe)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in parts.items()}
    if source.is_file():
        pipe.load_lora_weights(str(source.parent), weight_name=source.name)
    else:
        pipe.load_lora_weights(str(source))
    pipe.fuse_lora(components=list(parts), lora_scale=1.0)
    pipe.unload_lora_weights()
    out = {}
    for c, model in parts.items():
        for key, value in model.state_dict().items():
            if key.endswith(".weight") and key in before[c] and not torch.equal(value, before[c][key]):
                out[f"{c}.{key[: -len('.weight')]}"] = value - before[c][key]
    return out


def clair_deltas(source: Path, **options) -> dict[str, torch.Tensor]:
    """clair's update of each module (in the layer's weight layout), by the file's module name."""
    (ref,) = resolve_sources([str(source)], SourceOptions(**options))
    adapter = open_adapter(ref, SourceOptions(**options))
    return {module.name: module.delta_weight() for module in adapter.load()}


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """clair's deltas (by the file's names) equal diffusers' (by diffusers module name)."""
    if next(iter(ours)).startswith("lora_"):
        xl = any(n.startswith("text_encoder_2.") for n in theirs)
        theirs = {kohya_name(name, xl): delta for name, delta in theirs.items()}
    assert sorted(ours) == sorted(theirs)
    for name, delta in ours.items():
        assert delta.shape == theirs[name].shape, name
        torch.testing.assert_close(delta, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


# --- reading ---------------------------------------------------------------------------------


def test_kohya_modules_read_as_scale_up_at_down(kohya_pool: Path, layers) -> None:
    adapter = open_adapter(resolve_sources([str(kohya_pool / "style_1.safetensors")])[0])
    assert adapter.layout == "kohya"
    factors = pool_factors(layers)[1]
    conv = [m for m in factors if m.endswith("conv1")][0]
    for module in (conv, "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", next(iter(factors))):
        a, b = factors[module]
        spec = adapter.modules[kohya_name(module)]
        assert spec.scale == alpha_of(1) / RANK
        (read,) = adapter.load([kohya_name(module)])
        want = alpha_of(1) / RANK * (b.flatten(1) @ a.flatten(1))
        torch.testing.assert_close(read.delta(), want)
    assert adapter.modules[kohya_name(conv)].kind == "conv"


@pytest.mark.parametrize("name", ["style_1.safetensors", "style_5.safetensors"])
def test_kohya_updates_equal_what_diffusers_fuses(kohya_pool: Path, name: str) -> None:
    _same(clair_deltas(kohya_pool / name), fused_deltas(kohya_pool / name))


@pytest.mark.parametrize("k", [0, 1])
def test_diffusers_updates_equal_what_diffusers_fuses(diffusers_pool: Path, k: int) -> None:
    _same(clair_deltas(diffusers_pool / f"lora_{k}"), fused_deltas(diffusers_pool / f"lora_{k}"))


def test_kohya_alphas_are_per_module_and_differing_ones_get_a_note(layers, tmp_path: Path) -> None:
    factors = pool_factors(layers)[0]
    path = write_kohya(tmp_path / "mixed.safetensors", factors, 4.0)
    tensors = load_file(path)
    odd = kohya_name(next(iter(factors)))
    tensors[f"{odd}.alpha"] = torch.tensor(8.0)
    save_file(tensors, str(path))
    adapter = open_adapter(resolve_sources([str(path)])[0])
    assert adapter.modules[odd].scale == 2.0 and {s.scale for s in adapter.modules.values()} == {1.0, 2.0}
    assert any("alphas differ between modules" in n for n in adapter.notes)


def test_kohya_without_alpha_is_scale_one(layers, tmp_path: Path) -> None:
    path = write_kohya(tmp_path / "plain.safetensors", pool_factors(layers)[0], 0.0, with_alpha=False)
    adapter = open_adapter(resolve_sources([str(path)])[0])
    assert {s.scale for s in adapter.modules.values()} == {1.0}
    _same(clair_deltas(path), fused_deltas(path))


def test_diffusers_without_metadata_takes_lora_alpha(diffusers_pool: Path) -> None:
    (ref,) = resolve_sources([str(diffusers_pool / "lora_0")])
    assert {s.scale for s in open_adapter(ref).modules.values()} == {1.0}
    assert {s.scale for s in open_adapter(ref, SourceOptions(lora_alpha=8)).modules.values()} == {2.0}


@pytest.fixture(scope="module")
def xl_layers() -> dict[str, dict[str, tuple[int, ...]]]:
    return layers_of(tiny_pipeline(xl=True))


def test_sdxl_files_read_as_diffusers_fuses_them(xl_layers, tmp_path: Path) -> None:
    factors = pool_factors(xl_layers)[1]
    kohya = write_kohya(tmp_path / "xl.safetensors", factors, 2.0)
    assert any(k.startswith("lora_te2_") for k in load_file(kohya))
    _same(clair_deltas(kohya), fused_deltas(kohya, xl=True))
    directory = write_diffusers(tmp_path / "xl_diffusers", factors, 8.0)
    assert any(k.startswith("text_encoder_2.") for k in load_file(directory / "pytorch_lora_weights.safetensors"))
    _same(clair_deltas(directory), fused_deltas(directory, xl=True))


def test_merged_sdxl_kohya_file_loads_as_computed(xl_layers, tmp_path: Path) -> None:
    for k, factors in enumerate(pool_factors(xl_layers, seed=2)):
        write_kohya(tmp_path / "pool" / f"xl_{k}.safetensors", factors, alpha_of(k))
    out = tmp_path / "merged"
    result = invoke("merge", str(tmp_path / "pool"), "--out", str(out), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    _same(clair_deltas(out), fused_deltas(out, xl=True))


# --- audit, merge, refine ----------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["kohya_pool", "diffusers_pool"])
def test_audit_flags_the_boosted_adapter(pool: str, request) -> None:
    root = request.getfixturevalue(pool)
    result = invoke("audit", str(root), "--json", "-", "--device", "cpu")
    assert result.exit_code == 1, result.output
    flagged = json.loads(result.stdout)["flagged"]
    assert flagged == [f"{'style' if pool == 'kohya_pool' else 'lora'}_{BOOSTED}"]


def test_merged_kohya_file_loads_in_diffusers_as_computed(kohya_pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", str(kohya_pool), "--out", str(out), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]
    tensors = load_file(out / "pytorch_lora_weights.safetensors")
    source = load_file(kohya_pool / "style_0.safetensors")
    factors = {k for k in source if not k.endswith(".alpha")}
    assert {k for k in tensors if not k.endswith(".alpha")} == factors
    for key in factors:
        assert tensors[key].dim() == source[key].dim(), key  # conv factors stay 4-d
    # The merged ranks differ between modules here: no alpha (scale 1 in every loader).
    assert len({tensors[k].shape[0] for k in factors if k.endswith("lora_down.weight")}) > 1
    assert not any(k.endswith(".alpha") for k in tensors)
    _same(clair_deltas(out), fused_deltas(out))


def test_merged_kohya_file_of_one_rank_has_alpha_equal_to_rank(kohya_pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", str(kohya_pool), "--out", str(out), "--merge-rank", "2", "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    tensors = load_file(out / "pytorch_lora_weights.safetensors")
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == len(tensors) // 3 and set(alphas.values()) == {2.0}
    _same(clair_deltas(out), fused_deltas(out))


def test_merged_diffusers_file_loads_in_diffusers_as_computed(diffusers_pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke("merge", str(diffusers_pool), "--out", str(out), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    assert not (out / "adapter_config.json").exists()
    card = (out / "README.md").read_text().replace("\\_", "_")
    assert "library_name: diffusers" in card and "load_lora_weights" in card
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(load_file(diffusers_pool / "lora_0" / "pytorch_lora_weights.safetensors"))
    merged = clair_deltas(out)
    _same(merged, fused_deltas(out))
    # The boosted adapter was left out: the merge is of the size of the benign ones.
    benign = clair_deltas(diffusers_pool / "lora_0")
    name = next(iter(benign))
    assert merged[name].norm() < 3 * benign[name].norm()


def test_merge_mean_is_the_mean_of_the_inputs(kohya_pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "mean"
    result = invoke(
        "merge",
        str(kohya_pool),
        "--out",
        str(out),
        "--method",
        "mean",
        "--merge-tol",
        "0",
        "--device",
        "cpu",
        "--exit-zero",
    )
    assert result.exit_code == 0, result.output
    inputs = [clair_deltas(kohya_pool / f"style_{k}.safetensors") for k in range(K)]
    merged = clair_deltas(out)
    for name, delta in merged.items():
        torch.testing.assert_close(delta, sum(d[name] for d in inputs) / K, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", ["kohya_pool", "diffusers_pool"])
def test_refine_keeps_each_sources_layout_and_keys(pool: str, request, tmp_path: Path) -> None:
    root = request.getfixturevalue(pool)
    out = tmp_path / "refined"
    result = invoke("refine", str(root), "--out", str(out), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert written and all(not (out / n / "adapter_config.json").exists() for n in written)
    for name in written:
        source = root / (f"{name}.safetensors" if pool == "kohya_pool" else f"{name}/pytorch_lora_weights.safetensors")
        refined = out / name / "pytorch_lora_weights.safetensors"
        with safe_open(str(source), "pt") as f, safe_open(str(refined), "pt") as g:
            assert set(f.keys()) == set(g.keys())
            meta = "lora_adapter_metadata"
            assert (f.metadata() or {}).get(meta) == (g.metadata() or {}).get(meta)
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert f.get_tensor(key).shape == g.get_tensor(key).shape, key
        _same(clair_deltas(out / name), fused_deltas(out / name))


# --- refusals ----------------------------------------------------------------------------------


VARIANTS = {
    "loha": ("lora_unet_x_to_q.hada_w1_a", "LoHa"),
    "lokr": ("lora_unet_x_to_q.lokr_w1", "LoKr"),
    "dora": ("lora_unet_x_to_q.dora_scale", "DoRA"),
    "tucker": ("lora_unet_x_conv1.lora_mid.weight", "Tucker"),
    "diff": ("lora_unet_x_to_q.diff", "full weight difference"),
    "ia3": ("lora_unet_x_to_q.on_input", "IA3"),
}


def _kohya_with(tmp_path: Path, extra: dict[str, torch.Tensor], alpha: float = 4.0) -> Path:
    tensors = {
        "lora_unet_x_to_q.lora_down.weight": torch.randn(4, 8),
        "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 4),
        "lora_unet_x_to_q.alpha": torch.tensor(alpha),
        **extra,
    }
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    return path


def _refused(path: Path, *words: str) -> None:
    result = invoke("inspect", str(path))
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[0]
    assert line.startswith("Error: ") and path.name in line, result.output
    for word in words:
        assert word in line, result.output


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lycoris_variants_are_refused(variant: str, tmp_path: Path) -> None:
    key, word = VARIANTS[variant]
    _refused(_kohya_with(tmp_path, {key: torch.randn(4, 8)}), word, "not a plain LoRA")


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_alphas_are_refused(alpha: float, tmp_path: Path) -> None:
    _refused(_kohya_with(tmp_path, {}, alpha), "alpha must be a finite positive number")


def test_mixed_layouts_in_one_file_are_refused(tmp_path: Path) -> None:
    _refused(_kohya_with(tmp_path, {"unet.x.to_q.lora_A.weight": torch.randn(4, 8)}), "mixes kohya keys")


def test_old_diffusers_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    save_file(
        {"unet.x.to_q.lora.down.weight": torch.randn(4, 8), "unet.x.to_q.lora.up.weight": torch.randn(8, 4)}, path
    )
    _refused(path, "old attention-processor layout")


def test_a_pool_of_two_layouts_is_refused(kohya_pool: Path, diffusers_pool: Path) -> None:
    kohya = [str(kohya_pool / f"style_{k}.safetensors") for k in range(3)]
    result = invoke("audit", *kohya, *(str(diffusers_pool / f"lora_{k}") for k in range(3)), "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "kohya LoRA" in result.output and "diffusers LoRA" in result.output


def test_a_kohya_module_needs_both_factors(tmp_path: Path) -> None:
    path = tmp_path / "half.safetensors"
    save_file({"lora_unet_x_to_q.lora_down.weight": torch.randn(4, 8)}, str(path))
    _refused(path, "has lora_down but no lora_up")


def test_a_kohya_module_is_named_in_its_own_terms(tmp_path: Path) -> None:
    """A conv lora_up with a 3x3 kernel: the message says lora_up, as the file does (not PEFT's lora_B)."""
    path = tmp_path / "conv.safetensors"
    save_file(
        {
            "lora_unet_x_conv.lora_down.weight": torch.randn(4, 8, 3, 3),
            "lora_unet_x_conv.lora_up.weight": torch.randn(16, 4, 3, 3),
        },
        str(path),
    )
    _refused(path, "conv lora_up must have a 1x1 kernel")


def test_diffusers_keys_of_a_lycoris_variant_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "lokr.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.randn(4, 4)}, str(path))
    _refused(path, "LoKr")


LAYOUTS = {
    "SD 1.x kohya": (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_te_x.alpha"], "kohya"),
    "SDXL kohya": (["lora_te1_text_model_x.lora_up.weight", "lora_te2_text_model_x.lora_up.weight"], "kohya"),
    "Flux kohya": (["lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"], "kohya"),
    "SDXL diffusers": (["unet.a.lora_A.weight", "text_encoder_2.b.lora_B.weight"], "diffusers"),
    "Flux diffusers": (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "diffusers"),
    "PEFT": (["base_model.model.unet.a.lora_A.weight"], "peft"),
    # GPT-2's module path starts with "transformer.": a bare PEFT file of stripped keys stays PEFT.
    "GPT-2 stripped": (["transformer.h.0.attn.c_attn.lora_A.weight"], "peft"),
}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_layout_is_told_from_the_keys(case: str) -> None:
    from clair_cli.io.diffusion import layout_of
    from clair_cli.io.safetensors_file import TensorInfo

    keys, layout = LAYOUTS[case]
    tensors = {k: TensorInfo(k, "F32", (4, 4), 64) for k in keys}
    assert layout_of(Path("x.safetensors"), tensors, {}) == layout


def test_per_module_ranks_and_alphas_open_in_linear_time(tmp_path: Path) -> None:
    # kohya's resize_lora (dynamic rank) gives every module its own rank and alpha.
    import time

    n = 2000
    tensors = {}
    for i in range(n):
        r = 1 + i % 7
        tensors[f"lora_unet_m{i}_to_q.lora_down.weight"] = torch.ones(r, 4)
        tensors[f"lora_unet_m{i}_to_q.lora_up.weight"] = torch.ones(4, r)
        tensors[f"lora_unet_m{i}_to_q.alpha"] = torch.tensor(float(1 + i % 11))
    path = tmp_path / "resized.safetensors"
    save_file(tensors, str(path))
    start = time.process_time()  # this process's CPU time: a busy CI runner slows the clock, not the work
    adapter = open_adapter(resolve_sources([str(path)])[0])
    assert time.process_time() - start < 20.0
    for i in (0, 5, n - 1):
        assert adapter.modules[f"lora_unet_m{i}_to_q"].scale == (1 + i % 11) / (1 + i % 7)


def test_max_modules_is_checked_before_any_alpha_is_read(tmp_path: Path) -> None:
    path = _kohya_with(
        tmp_path,
        {
            "lora_unet_y_to_q.lora_down.weight": torch.randn(4, 8),
            "lora_unet_y_to_q.lora_up.weight": torch.randn(8, 4),
            "lora_unet_y_to_q.alpha": torch.tensor(float("nan")),
        },
    )
    result = invoke("inspect", str(path), "--max-modules", "1")
    assert result.exit_code == 2 and "more than --max-modules 1" in result.output, result.output


def test_library_errors_are_clair_errors(tmp_path: Path) -> None:
    path = _kohya_with(tmp_path, {"lora_unet_x_to_q.hada_w1_a": torch.randn(4, 8)})
    with pytest.raises(AdapterFormatError, match="LoHa"):
        open_adapter(resolve_sources([str(path)])[0])


def test_a_config_does_not_apply_to_a_kohya_file(tmp_path: Path) -> None:
    path = _kohya_with(tmp_path, {})
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    result = invoke("inspect", str(path), "--config", str(config))
    assert result.exit_code == 2 and "kohya LoRA file" in result.output, result.output
