"""ComfyUI-layout LoRA files: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` (or
``.lora_down.weight`` / ``.lora_up.weight``) and ``.alpha``, under the original checkpoint's module
names, as ComfyUI, musubi-tuner and ai-toolkit write Wan, Qwen-Image, HunyuanVideo and Flux LoRAs.
Read as the updates diffusers' loaders of those pipelines apply (``lora_state_dict``, the
conversion ``load_lora_weights`` runs first), audited, and written back with the same keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clair_cli.io.diffusion import layout_of
from clair_cli.io.safetensors_file import read_header
from tests.test_diffusion_formats import _refused, clair_deltas, invoke

PREFIX = "diffusion_model."
# Qwen-Image's module names (diffusers' own: its loader strips the prefix and keeps them), shaped
# as in tiny_qwen's transformer.
QWEN = {
    "transformer_blocks.0.attn.to_q": (24, 24),
    "transformer_blocks.0.attn.to_k": (24, 24),
    "transformer_blocks.0.img_mlp.net.2": (24, 96),
    "transformer_blocks.1.attn.add_q_proj": (24, 24),
}
# Wan's original names and what diffusers' Wan loader renames them to.
WAN = {
    "blocks.0.self_attn.q": ("blocks.0.attn1.to_q", (16, 16)),
    "blocks.0.self_attn.o": ("blocks.0.attn1.to_out.0", (16, 16)),
    "blocks.0.cross_attn.k": ("blocks.0.attn2.to_k", (16, 16)),
    "blocks.0.ffn.0": ("blocks.0.ffn.net.0.proj", (32, 16)),
}
RANK = 4


def comfy_file(
    path: Path, shapes: dict[str, tuple[int, int]], seed: int, spelling: str, alphas: str, scale: float = 1.0
) -> Path:
    """A ComfyUI-layout file of random factors; ``alphas``: ``all``, ``some`` (every other module)
    or ``none``; ``spelling``: ``lora_A`` (lora_A / lora_B) or ``lora_down`` (lora_down / lora_up)."""
    g = torch.Generator().manual_seed(seed)
    a_part, b_part = ("lora_A", "lora_B") if spelling == "lora_A" else ("lora_down", "lora_up")
    tensors = {}
    for i, (module, (d_out, d_in)) in enumerate(sorted(shapes.items())):
        key = PREFIX + module
        tensors[f"{key}.{a_part}.weight"] = torch.randn(RANK, d_in, generator=g) / d_in**0.5
        tensors[f"{key}.{b_part}.weight"] = scale * torch.randn(d_out, RANK, generator=g) / RANK**0.5
        if alphas == "all" or (alphas == "some" and i % 2 == 0):
            tensors[f"{key}.alpha"] = torch.tensor(float(1 + (seed + i) % 8))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def diffusers_deltas(path: Path, pipeline: str) -> dict[str, torch.Tensor]:
    """What diffusers' ``pipeline`` loader makes of the file: ``B @ A`` per module, by its module name."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin, WanLoraLoaderMixin

    loader = QwenImageLoraLoaderMixin if pipeline == "qwen" else WanLoraLoaderMixin
    state = loader.lora_state_dict(str(path))
    out = {}
    for key, A in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[module] = state[key.replace(".lora_A.", ".lora_B.")].double() @ A.double()
    return out


def fused_deltas(directory: Path) -> dict[str, torch.Tensor]:
    """What a tiny QwenImagePipeline (a two-block transformer built from its config, no other
    component) adds to each weight when it loads the LoRA at ``directory`` and fuses it."""
    import logging
    import warnings

    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    pipe.load_lora_weights(str(directory))
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return {
        key.removesuffix(".weight"): (value - before[key]).double()
        for key, value in transformer.state_dict().items()
        if key.endswith(".weight") and not torch.equal(value, before[key])
    }


def _same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    assert sorted(names[m] for m in ours) == sorted(theirs)
    for module, delta in ours.items():
        torch.testing.assert_close(delta.double(), theirs[names[module]], rtol=1e-5, atol=1e-7, msg=module)


@pytest.mark.parametrize("spelling", ["lora_A", "lora_down"])
@pytest.mark.parametrize("alphas", ["all", "some", "none"])
def test_comfy_files_read_as_diffusers_qwen_and_wan_loaders_read_them(
    spelling: str, alphas: str, tmp_path: Path
) -> None:
    """Each module's update is ``alpha / r * B @ A`` where it stores an alpha and ``B @ A`` where it
    does not, as diffusers' Qwen-Image and Wan loaders fold them (and ComfyUI applies them)."""
    qwen = comfy_file(tmp_path / "qwen.safetensors", QWEN, 1, spelling, alphas)
    _same(clair_deltas(qwen), diffusers_deltas(qwen, "qwen"), {PREFIX + m: m for m in QWEN})
    wan = comfy_file(tmp_path / "wan.safetensors", {m: s for m, (_, s) in WAN.items()}, 2, spelling, alphas)
    _same(clair_deltas(wan), diffusers_deltas(wan, "wan"), {PREFIX + m: d for m, (d, _) in WAN.items()})


def test_the_layout_is_told_from_the_prefix(tmp_path: Path) -> None:
    path = comfy_file(tmp_path / "a.safetensors", QWEN, 0, "lora_A", "all")
    assert layout_of(path, *read_header(path)) == "comfyui"
    result = invoke("inspect", str(path), "--json", str(tmp_path / "i.json"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "i.json").read_text())["adapters"][0]["layout"] == "comfyui"
    # The Targets cell names what each module targets; a Sequential's index keeps its parent.
    table = invoke("inspect", str(path)).output
    assert "net.2" in table and "to_q" in table and ", 2," not in table


def _pool(root: Path, spelling: str = "lora_A", boosted: int | None = None) -> Path:
    for k in range(8):
        comfy_file(root / f"style_{k}.safetensors", QWEN, 10 + k, spelling, "all", 10.0 if k == boosted else 1.0)
    return root


def test_audit_flags_a_boosted_comfy_lora_without_any_flag(tmp_path: Path) -> None:
    """No config, no --lora-alpha: the file's alphas (or alpha = rank) give every scale."""
    root = _pool(tmp_path / "pool", boosted=5)
    result = invoke("audit", str(root), "--device", "cpu", "--json", str(tmp_path / "a.json"))
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "a.json").read_text())
    flagged = [a["name"] for a in report["adapters"] if a["flagged"]]
    assert flagged == ["style_5"]


@pytest.mark.parametrize("spelling", ["lora_A", "lora_down"])
def test_merged_comfy_file_keeps_the_keys_and_loads_as_computed(spelling: str, tmp_path: Path) -> None:
    """The mean merge, written as ``pytorch_lora_weights.safetensors`` with the inputs' keys and no
    alpha (scale 1 in every module, as every reader takes a module without one): diffusers' Qwen-Image
    loader reads it as the mean of what it reads from the inputs, and a Qwen-Image pipeline loads and
    fuses it as clair computed it."""
    root = _pool(tmp_path / "pool", spelling)
    out = tmp_path / "merged"
    args = ("merge", str(root), "--out", str(out), "--method", "mean", "--merge-tol", "0", "--device", "cpu")
    result = invoke(*args, "--exit-zero")
    assert result.exit_code == 0, result.output
    merged = out / "pytorch_lora_weights.safetensors"
    assert not (out / "adapter_config.json").exists()
    with safe_open(str(merged), "pt") as f, safe_open(str(root / "style_0.safetensors"), "pt") as g:
        assert set(f.keys()) == {k for k in g.keys() if not k.endswith(".alpha")}  # noqa: SIM118
    inputs = [diffusers_deltas(root / f"style_{k}.safetensors", "qwen") for k in range(8)]
    theirs = diffusers_deltas(merged, "qwen")
    for module, delta in theirs.items():
        torch.testing.assert_close(delta, sum(d[module] for d in inputs) / 8, rtol=1e-4, atol=1e-6)
    _same(clair_deltas(out), theirs, {PREFIX + m: m for m in QWEN})
    _same(clair_deltas(out), fused_deltas(out), {PREFIX + m: m for m in QWEN})


def test_refined_comfy_files_keep_every_key(tmp_path: Path) -> None:
    root = _pool(tmp_path / "pool", "lora_down")
    out = tmp_path / "refined"
    result = invoke("refine", str(root), "--out", str(out), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert written
    for name in written:
        refined = out / name / "pytorch_lora_weights.safetensors"
        with safe_open(str(root / f"{name}.safetensors"), "pt") as f, safe_open(str(refined), "pt") as g:
            assert set(f.keys()) == set(g.keys())  # noqa: SIM118
        _same(clair_deltas(out / name), fused_deltas(out / name), {PREFIX + m: m for m in QWEN})


def _comfy_with(tmp_path: Path, extra: dict[str, torch.Tensor], drop: str | None = None) -> Path:
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 8),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(8, 4),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
        **extra,
    }
    tensors.pop(drop or "", None)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("extra", "drop", "words"),
    [
        ({"diffusion_model.blocks.0.self_attn.q.diff": torch.randn(8, 8)}, None, ("full weight difference", "[8, 8]")),
        ({"diffusion_model.blocks.0.self_attn.k.hada_w1_a": torch.randn(4, 8)}, None, ("LoHa",)),
        ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 8)}, None, ("two lora_A",)),
        ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(8, 4)}, None, ("two lora_B",)),
        ({"diffusion_model.blocks.0.x.lora_A.weight.lora_A.weight": torch.randn(4, 8)}, None, ("holds 'lora_A'",)),
        ({"diffusion_model.blocks..0.q.lora_A.weight": torch.randn(4, 8)}, None, ("not a plain LoRA tensor",)),
        ({"diffusion_model.blocks.0.self_attn.k.alpha": torch.tensor(4.0)}, None, ("alpha", "no lora_A")),
        ({}, "diffusion_model.blocks.0.self_attn.q.lora_B.weight", ("has lora_A but no lora_B",)),
        ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 8)}, None, ("mixes",)),
        ({"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor([1.0, 2.0])}, None, ("one number",)),
    ],
    ids=[
        "matrix-diff",
        "loha",
        "two-spellings",
        "two-spellings-b",
        "nested-name",
        "empty-segment",
        "orphan-alpha",
        "half-module",
        "mixed-layouts",
        "alpha-shape",
    ],
)
def test_what_is_not_a_plain_comfy_lora_is_refused(extra: dict, drop: str | None, words: tuple, tmp_path: Path) -> None:
    _refused(_comfy_with(tmp_path, extra, drop), *words)


def test_a_config_does_not_apply_to_a_comfy_file(tmp_path: Path) -> None:
    directory = tmp_path / "adapter"
    comfy_file(directory / "adapter_model.safetensors", QWEN, 0, "lora_A", "all")
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    result = invoke("inspect", str(directory))
    assert result.exit_code == 2, result.output
    assert "ComfyUI" in result.output and "does not apply" in result.output


def test_a_module_of_two_spellings_is_refused(tmp_path: Path) -> None:
    """ComfyUI pairs lora_A with lora_B and lora_down with lora_up: a lora_A beside a lora_up is read by
    neither of its pairings."""
    path = tmp_path / "odd.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 8),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(8, 4),
        },
        str(path),
    )
    _refused(path, "pairs two spellings")


def test_lorasave_files_with_text_encoders_and_zero_differences_are_read(tmp_path: Path) -> None:
    """What ComfyUI's LoraSave writes from a plain LoRA: text-encoder modules under ``text_encoders.``,
    and a zero ``diff_b`` / ``diff`` for every bias and norm (left out, with a note); a difference that is
    not zero is kept and not analysed, as PEFT's LoRA biases are, and a merge then asks for
    --drop-extras."""
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"

    def write(root: Path, k: int, bias: float) -> None:
        path = comfy_file(root / f"s{k}.safetensors", QWEN, 20 + k, "lora_down", "all")
        tensors = {key: t for key, t in safe_open_all(path).items()}
        tensors[f"{te}.lora_down.weight"] = torch.randn(RANK, 16)
        tensors[f"{te}.lora_up.weight"] = torch.randn(16, RANK)
        tensors[f"{te}.alpha"] = torch.tensor(2.0)
        tensors["diffusion_model.transformer_blocks.0.attn.to_q.diff_b"] = torch.full((24,), bias)
        tensors["diffusion_model.transformer_blocks.0.attn.norm_q.diff"] = torch.zeros(8)
        save_file(tensors, str(path))

    zero, kept = tmp_path / "zero", tmp_path / "kept"
    for k in range(6):
        write(zero, k, 0.0)
        write(kept, k, 0.5)
    result = invoke("inspect", str(zero / "s0.safetensors"), "--json", str(tmp_path / "z.json"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "z.json").read_text())["adapters"][0]
    assert record["n_modules"] == len(QWEN) + 1 and record["layout"] == "comfyui"
    assert any("all-zero bias / norm difference" in n for n in record["notes"]), record["notes"]
    assert clair_deltas(zero / "s0.safetensors")[te].shape == (16, 16)
    out = tmp_path / "merged"
    result = invoke("merge", str(zero), "--out", str(out), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 0, result.output
    result = invoke("merge", str(kept), "--out", str(tmp_path / "m2"), "--device", "cpu", "--exit-zero")
    assert result.exit_code == 2 and "--drop-extras" in result.output, result.output
    assert not (tmp_path / "m2").exists()


def safe_open_all(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def _modules(path: Path, modules: dict[str, tuple[int, int]]) -> Path:
    """A ComfyUI-layout file of ``modules`` (full names, with their prefix) of random factors and alphas."""
    tensors = {}
    for module, (d_out, d_in) in modules.items():
        tensors[f"{module}.lora_A.weight"] = torch.randn(RANK, d_in)
        tensors[f"{module}.lora_B.weight"] = torch.randn(d_out, RANK)
        tensors[f"{module}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, str(path))
    return path


CLIP_L = "text_encoders.clip_l.transformer."
# One layer under two spellings that ComfyUI and diffusers read as one: (the module the file's other modules
# spell it as, its twin of another spelling, words of the refusal).
TWINS = {
    "text-model": (
        CLIP_L + "text_model.encoder.layers.0.self_attn.q_proj",
        CLIP_L + "encoder.layers.0.self_attn.q_proj",
        ("with and without text_model",),
    ),
    "flux-qkv": (
        PREFIX + "double_blocks.0.img_attn.qkv",
        PREFIX + "transformer_blocks.0.attn.to_k",
        ("Black Forest Labs", "diffusers transformer names", "one layer under two spellings"),
    ),
    "flux-proj": (
        PREFIX + "double_blocks.0.img_attn.proj",
        PREFIX + "transformer_blocks.0.attn.to_out.0",
        ("Black Forest Labs", "one layer under two spellings"),
    ),
    "flux-img-in": (PREFIX + "img_in", PREFIX + "x_embedder", ("Black Forest Labs", "one layer under two spellings")),
    "sdxl": (
        PREFIX + "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        PREFIX + "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ("SGM / LDM UNet names", "diffusers UNet names", "one layer under two spellings"),
    ),
    "wan": (PREFIX + "blocks.0.self_attn.q", PREFIX + "blocks.0.attn1.to_q", ("Wan's own names", "diffusers' Wan")),
    "wan-i2v": (
        PREFIX + "blocks.1.cross_attn.k_img",
        PREFIX + "blocks.1.attn2.add_k_proj",
        ("Wan's own names", "diffusers' Wan"),
    ),
    "wan-ffn": (PREFIX + "blocks.0.ffn.0", PREFIX + "blocks.0.ffn.net.0.proj", ("one layer under two spellings",)),
    "wan-head": (PREFIX + "head.head", PREFIX + "proj_out", ("one layer under two spellings",)),
}
# Each twin's file also holds a module of its model's own spelling, as a real LoRA does.
TWIN_COMPANIONS = {
    "text-model": PREFIX + "double_blocks.0.img_mlp.0",
    "flux-qkv": PREFIX + "double_blocks.1.img_attn.proj",
    "flux-proj": PREFIX + "single_blocks.0.linear2",
    "flux-img-in": PREFIX + "double_blocks.0.img_mlp.0",
    "sdxl": PREFIX + "input_blocks.1.0.in_layers.2",
    "wan": PREFIX + "blocks.1.self_attn.k",
    "wan-i2v": PREFIX + "blocks.0.cross_attn.q",
    "wan-ffn": PREFIX + "blocks.0.ffn.2",
    "wan-head": PREFIX + "blocks.0.self_attn.o",
}


@pytest.mark.parametrize("case", sorted(TWINS))
def test_one_layer_under_two_spellings_is_refused(case: str, tmp_path: Path) -> None:
    """ComfyUI maps a file's ``diffusion_model.`` / ``text_encoders.`` keys onto its model's own names and applies
    one spelling of a layer; diffusers' Flux and Wan loaders refuse such a file (or apply one of the two): clair
    refuses it (exit 2, the file and both modules named) rather than audit one layer as two modules. The file
    without the twin is read."""
    own, twin, words = TWINS[case]
    shapes = {own: (16, 16), TWIN_COMPANIONS[case]: (16, 16)}
    alone = _modules(tmp_path / "alone.safetensors", shapes)
    result = invoke("inspect", str(alone), "--json", str(tmp_path / "i.json"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "i.json").read_text())["adapters"][0]["n_modules"] == 2
    _refused(_modules(tmp_path / "twins.safetensors", {**shapes, twin: (16, 16)}), own, twin, *words)


def test_a_wan_file_of_both_block_spellings_is_refused(tmp_path: Path) -> None:
    """Wan's own block names beside diffusers' in other blocks: ComfyUI applies only its model's (Wan's) and
    diffusers' Wan loader refuses the file (its conversion leaves the diffusers-named keys over)."""
    own, other = PREFIX + "blocks.0.self_attn.q", PREFIX + "blocks.1.attn1.to_k"
    _refused(_modules(tmp_path / "mixed.safetensors", {own: (16, 16), other: (16, 16)}), "two ways", own, other)


def test_wan_and_flux_files_of_one_spelling_are_read(tmp_path: Path) -> None:
    """Every Wan layer diffusers' Wan loader renames, under Wan's own names and under diffusers' (each file alone),
    and a Flux file's blocks and layers outside them: one module each."""
    wan = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k"]
    wan += ["cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"]
    ours = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k"]
    ours += ["attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2"]
    outside = ["head.head", "time_projection.1", "text_embedding.0", "time_embedding.2", "img_emb.proj.1"]
    flux = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1", "img_in"]
    files = {
        "wan": [f"blocks.{i}.{m}" for i in (0, 1) for m in wan] + outside,
        "wan_diffusers": [f"blocks.{i}.{m}" for i in (0, 1) for m in ours] + ["proj_out", "condition_embedder.proj"],
        "flux": [*flux, "final_layer.linear", "txt_in", "time_in.in_layer"],
    }
    for name, modules in files.items():
        path = _modules(tmp_path / f"{name}.safetensors", {PREFIX + m: (16, 16) for m in modules})
        result = invoke("inspect", str(path), "--json", str(tmp_path / f"{name}.json"))
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / f"{name}.json").read_text())["adapters"][0]["n_modules"] == len(modules)
