"""One layer of a diffusion model named twice in one LoRA file: refused, never read as two modules.

A diffusion model's layers have several spellings in LoRA files, and loaders map each of them onto
the same layer:

- the first text encoder: sd-scripts' ``lora_te_`` (SD 1.x / 2.x) and ``lora_te1_`` (SDXL, Flux);
- a CLIP text encoder's layer with and without ``text_model`` before it (diffusers strips it where
  the model has no such level, as transformers 5's CLIPTextModel), in either layout;
- an SD / SDXL UNet: Stability's SGM / LDM names (``input_blocks.4.1``, ``middle_block``,
  ``output_blocks``, ``time_embed``, ``label_emb``) and diffusers' (``down_blocks.1.attentions.0``,
  ``mid_block``, ``up_blocks``, ``time_embedding``, ``add_embedding``);
- Flux: Black Forest Labs' names (``double_blocks.0.img_attn.qkv``, ``single_blocks.0.linear1``,
  ``img_in``...) and diffusers' (``transformer_blocks.0.attn.to_q``, ``single_transformer_blocks``...);
  SD3: SAI's MMDiT names (``joint_blocks``) and diffusers' again;
- in sd-scripts' layout, the denoiser as ``lora_unet_`` (sd-scripts' own Flux, SD3, Lumina) and as
  ``lora_transformer_`` (diffusers' names);
- Wan, in ComfyUI's layout: Wan's own block names (``blocks.0.self_attn.q``, ``cross_attn.k_img``,
  ``ffn.0``) and diffusers' (``blocks.0.attn1.to_q``, ``attn2.add_k_proj``, ``ffn.net.0.proj``), as
  diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` maps them.

ComfyUI's layout (``diffusion_model.<path>``, ``text_encoders.<encoder>.transformer.<path>``) takes
the denoiser's and the text encoders' spellings above: ComfyUI maps ``diffusion_model.`` and
``text_encoders.`` keys onto its model's own state-dict names only (``model_lora_keys_unet``,
``model_lora_keys_clip``: SGM UNet blocks, Black Forest Labs' Flux blocks, Wan's own names, CLIP with
``text_model``), and leaves a module of another spelling unloaded.

clair keeps each file's own names, so a file that holds one layer under two spellings would be
audited as two modules, while diffusers keeps one spelling and drops the other without a word
(``_maybe_map_sgm_blocks_to_diffusers`` drops the SGM modules of a file that also has diffusers'
UNet names; ``_convert_kohya_flux_lora_to_diffusers`` drops every ``lora_unet_`` module of a file
that also has ``lora_transformer_`` ones). A file whose denoiser modules come in two spellings is
refused, with the twin pair named where the names map onto one layer (SGM blocks mapped as
diffusers maps them, with SD / SDXL's two layers a block, except SD 1.x's ``output_blocks.2.1.conv``:
the first up block's upsampler, which diffusers maps to no layer; BFL names as
``_convert_kohya_flux_lora_to_diffusers`` maps them, a fused ``qkv`` onto ``to_q``, ``to_k`` and ``to_v``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from clair_cli.errors import AdapterFormatError
from clair_cli.io.paths import printable

if TYPE_CHECKING:
    from pathlib import Path

# The block containers that tell a denoiser's spelling apart: a module's path (after lora_unet_ /
# unet. / transformer.) starts with one of them. Layers outside the blocks do not count here:
# diffusers' transformer models reuse those words for layers of their own (Qwen-Image's img_in and
# txt_in, Sana's and LTX-Video's time_embed, CogVideoX's time_embedding), beside transformer_blocks.
FAMILIES = {
    "sgm": (
        ("input_blocks", "middle_block", "output_blocks"),
        "SGM / LDM UNet names: input_blocks, middle_block, output_blocks",
    ),
    "unet": (("down_blocks", "mid_block", "up_blocks"), "diffusers UNet names: down_blocks, mid_block, up_blocks"),
    "bfl": (("double_blocks", "single_blocks"), "Black Forest Labs Flux names: double_blocks, single_blocks"),
    "mmdit": (("joint_blocks",), "SAI MMDiT names: joint_blocks"),
    "transformer": (
        ("transformer_blocks", "single_transformer_blocks"),
        "diffusers transformer names: transformer_blocks, single_transformer_blocks",
    ),
}
# Wan's blocks (ComfyUI's layout only), told by their layers rather than their container (``blocks`` in
# both spellings): Wan's own names, as diffusers' _convert_non_diffusers_wan_lora_to_diffusers (0.42)
# maps them onto its WanTransformer3DModel's, and those names of diffusers'.
WAN_FAMILIES = {
    "wan": "Wan's own names: blocks.N.self_attn, cross_attn, ffn.0 / ffn.2",
    "wan_diffusers": "diffusers' Wan names: blocks.N.attn1, attn2, ffn.net",
}
_WAN_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out_0", "k_img": "add_k_proj", "v_img": "add_v_proj"}
_WAN_BLOCK = {
    **{f"self_attn_{o}": f"attn1_{c}" for o, c in _WAN_ATTENTION.items() if "img" not in o},
    **{f"cross_attn_{o}": f"attn2_{c}" for o, c in _WAN_ATTENTION.items()},
    "ffn_0": "ffn_net_0_proj",
    "ffn_2": "ffn_net_2",
}
_WAN_WHOLE = {
    "time_projection_1": "condition_embedder_time_proj",
    "head_head": "proj_out",
    "text_embedding_0": "condition_embedder_text_embedder_linear_1",
    "text_embedding_2": "condition_embedder_text_embedder_linear_2",
    "time_embedding_0": "condition_embedder_time_embedder_linear_1",
    "time_embedding_2": "condition_embedder_time_embedder_linear_2",
    "img_emb_proj_1": "condition_embedder_image_embedder_ff_net_0_proj",
    "img_emb_proj_3": "condition_embedder_image_embedder_ff_net_2",
}
_WAN_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")
_WAN_DIFFUSERS_BLOCK = frozenset(_WAN_BLOCK.values())
DIFFUSERS_FAMILIES = ("unet", "transformer", "wan_diffusers")  # already diffusers' names
KOHYA_DENOISER = ("lora_unet_", "lora_transformer_")
DIFFUSERS_DENOISER = ("unet.", "transformer.", "prior.")
COMFY_DENOISER = ("diffusion_model.",)
# A ComfyUI file's text encoder modules: text_encoders.<encoder>.transformer.<path> (model_lora_keys_clip).
COMFY_TEXT_ENCODERS = "text_encoders."
COMFY_TRANSFORMER = "transformer."
# A text encoder's modules in sd-scripts' layout (lora_te_ and lora_te1_ both name the first) and in diffusers'.
KOHYA_TEXT_ENCODERS = {"lora_te_": "te1", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te3_": "te3"}
DIFFUSERS_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# transformers 5 flattens CLIPTextModel (no text_model level; CLIPTextModelWithProjection keeps it), and diffusers
# 0.42 strips a leading text_model. from a text encoder's LoRA keys when its model has none
# (_load_lora_into_text_encoder; sd-scripts' lora_te_text_model_... converts to text_model....), and loads only
# the spelling the model has otherwise: a layer spelled with and without it is one layer, one update applied.
TEXT_MODEL = "text_model"
TWO_SPELLINGS_HINT = "Keep one spelling of each layer (the one the file's other modules use) and save the file again."

# SD / SDXL's UNet has two layers a block (layers_per_block = 2): SGM's input block i is diffusers'
# down block (i - 1) // 3, layer (i - 1) % 3; output block i is up block i // 3, layer i % 3.
_LAYERS_PER_BLOCK = 2
_RESNET_PARTS = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"))
_SGM_WHOLE = {
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "out_2": "conv_out",  # diffusers' _convert_unet_lora_key: out.2 -> conv_out
}
_SGM_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)_(\d{1,9})_(\d{1,9})(?:_(.*))?$")  # int() of bounded digits
_SGM_MIDDLE_RE = re.compile(r"^middle_block_([012])(?:_(.*))?$")
_SGM_MIDDLE = ("resnets_0", "attentions_0", "resnets_1")
# Black Forest Labs' Flux names and diffusers' (_convert_kohya_flux_lora_to_diffusers); {i}: the block.
_QKV = ("to_q", "to_k", "to_v")
_BFL_DOUBLE = {
    "img_attn_proj": ("attn_to_out_0",),
    "img_attn_qkv": tuple(f"attn_{p}" for p in _QKV),
    "img_mlp_0": ("ff_net_0_proj",),
    "img_mlp_2": ("ff_net_2",),
    "img_mod_lin": ("norm1_linear",),
    "txt_attn_proj": ("attn_to_add_out",),
    "txt_attn_qkv": ("attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"),
    "txt_mlp_0": ("ff_context_net_0_proj",),
    "txt_mlp_2": ("ff_context_net_2",),
    "txt_mod_lin": ("norm1_context_linear",),
}
_BFL_SINGLE = {
    "linear1": (*(f"attn_{p}" for p in _QKV), "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm_linear",),
}
_BFL_WHOLE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed_timestep_embedder_linear_1",
    "time_in_out_layer": "time_text_embed_timestep_embedder_linear_2",
    "vector_in_in_layer": "time_text_embed_text_embedder_linear_1",
    "vector_in_out_layer": "time_text_embed_text_embedder_linear_2",
    "guidance_in_in_layer": "time_text_embed_guidance_embedder_linear_1",
    "guidance_in_out_layer": "time_text_embed_guidance_embedder_linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out_linear",
}
_BFL_BLOCK_RE = re.compile(r"^(double|single)_blocks_(\d+)_(.+)$")
# SAI's SD3 MMDiT names and diffusers' (convert_sd3_transformer_checkpoint_to_diffusers).
_MMDIT_WHOLE = {
    "x_embedder_proj": "pos_embed_proj",
    "t_embedder_mlp_0": "time_text_embed_timestep_embedder_linear_1",
    "t_embedder_mlp_2": "time_text_embed_timestep_embedder_linear_2",
    "y_embedder_mlp_0": "time_text_embed_text_embedder_linear_1",
    "y_embedder_mlp_2": "time_text_embed_text_embedder_linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out_linear",
}
_MMDIT_BLOCK = {
    "x_block_attn_qkv": tuple(f"attn_{p}" for p in _QKV),
    "x_block_attn_proj": ("attn_to_out_0",),
    "x_block_mlp_fc1": ("ff_net_0_proj",),
    "x_block_mlp_fc2": ("ff_net_2",),
    "x_block_adaLN_modulation_1": ("norm1_linear",),
    "context_block_attn_qkv": ("attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"),
    "context_block_attn_proj": ("attn_to_add_out",),
    "context_block_mlp_fc1": ("ff_context_net_0_proj",),
    "context_block_mlp_fc2": ("ff_context_net_2",),
    "context_block_adaLN_modulation_1": ("norm1_context_linear",),
}
_MMDIT_BLOCK_RE = re.compile(r"^(joint)_blocks_(\d+)_(.+)$")
_BFL_BLOCKS = {"double": ("transformer_blocks", _BFL_DOUBLE), "single": ("single_transformer_blocks", _BFL_SINGLE)}
_MMDIT_BLOCKS = {"joint": ("transformer_blocks", _MMDIT_BLOCK)}


def refuse_two_spellings(path: Path, modules: Iterable[str], layout: str) -> None:
    """Refuse a kohya, diffusers or ComfyUI file (``layout``: ``kohya``, ``diffusers``, ``comfyui``)
    that names one layer twice, or spells its denoiser two ways (see the module docstring).

    A file's spelling is told by its blocks (:data:`FAMILIES`); a layer outside them (an embedding,
    the final layer) is mapped onto diffusers' name by the spelling of the file's blocks only, so
    that diffusers' own transformer layers named like another model's (Qwen-Image's ``img_in``) are
    read as what they are.

    Raises:
        AdapterFormatError: naming the file, the two modules and what they spell.
    """
    names = sorted(modules)
    _refuse_two_text_encoder_spellings(path, names, layout)
    paths = {m: rest for m in names if (rest := _denoiser_path(m, layout)) is not None}
    # In sd-scripts' layout, lora_unet_ beside lora_transformer_ is Flux's mixture: BFL names under lora_unet_.
    mixture = layout == "kohya" and {m.startswith("lora_unet_") for m in paths} == {True, False}
    families = {m: _family(m, rest) for m, rest in paths.items()}
    blocks = {f for f in families.values() if f}
    twin = _twin(paths, families, blocks, mixture)
    if twin is not None:
        (a, fa), (b, fb) = twin
        raise _bad(
            path,
            f"module {printable(a)!r} ({_spelled(fa, a)}) is also stored as {printable(b)!r} "
            f"({_spelled(fb, b)}): one layer under two spellings",
            _who_drops(fa, fb, mixture, layout),
        )
    first: dict[str, str] = {}  # a module of each spelling
    for module, family in families.items():
        if family:
            first.setdefault(family, module)
    pairs = sorted((module, family) for family, module in first.items())
    if mixture:  # lora_unet_ and lora_transformer_: two spellings, whatever the paths after them
        unet = next(m for m in paths if m.startswith("lora_unet_"))
        other = next(m for m in paths if m.startswith("lora_transformer_"))
        pairs = [(unet, families[unet]), (other, "transformer")]
    if len(pairs) > 1:
        (a, fa), (b, fb) = pairs[:2]
        raise _bad(
            path,
            f"spells its denoiser two ways: {printable(a)!r} ({_spelled(fa, a)}) and {printable(b)!r} "
            f"({_spelled(fb, b)})",
            _who_drops(fa, fb, mixture, layout),
        )
    if layout == "kohya":
        _refuse_sd_aliases(path, names, paths, blocks)


def _bad(path: Path, problem: str, consequence: str) -> AdapterFormatError:
    return AdapterFormatError(f"{printable(str(path))}: {problem}; {consequence}", hint=TWO_SPELLINGS_HINT)


def _refuse_two_text_encoder_spellings(path: Path, names: list[str], layout: str) -> None:
    """Two modules of a kohya or diffusers file (``layout``) that name one text-encoder layer: ``lora_te_X``
    and ``lora_te1_X``, or a layer with and without ``text_model`` before it (:data:`TEXT_MODEL`).

    Raises:
        AdapterFormatError: naming the file and the two modules.
    """
    seen: dict[tuple[str, str], str] = {}
    for module in names:
        layer = _text_encoder_layer(module, layout)
        if layer is None:
            continue
        other = seen.setdefault(layer, module)
        if other == module:
            continue
        first, second = sorted((other, module), key=lambda m: not m.startswith("lora_te_"))
        if second == "lora_te1_" + first.removeprefix("lora_te_"):
            raise AdapterFormatError(
                f"{printable(str(path))}: module {printable(first)!r} is also stored as {printable(second)!r} "
                "(lora_te_ and lora_te1_ both name the first text encoder): loaders read the two as one module "
                "and differ on which they apply",
                hint="Keep one spelling (lora_te_ for SD 1.x / 2.x, lora_te1_ for SDXL) and save the file again.",
            )
        if layout == "comfyui":
            raise AdapterFormatError(
                f"{printable(str(path))}: module {printable(other)!r} is also stored as {printable(module)!r} (one "
                "text encoder layer with and without text_model before it): ComfyUI applies only the spelling its "
                "model has (text_model, in its CLIP text encoders) and leaves the other unloaded, while clair would "
                "audit each as a module of its own",
                hint="Keep one spelling of each text encoder layer (with text_model, as ComfyUI's LoraSave writes "
                "it) and save the file again.",
            )
        raise AdapterFormatError(
            f"{printable(str(path))}: module {printable(other)!r} is also stored as {printable(module)!r} (one text "
            "encoder layer with and without text_model before it): diffusers (0.42) applies only one of them (it "
            "strips text_model where the model has none, as transformers 5's CLIPTextModel, and loads only the "
            "spelling the model has otherwise), while clair would audit each as a module of its own",
            hint="Keep one spelling of each text encoder layer (with text_model, as sd-scripts and diffusers write "
            "it) and save the file again.",
        )


def _text_encoder_layer(module: str, layout: str) -> tuple[str, str] | None:
    """``(text encoder, path)`` of a kohya, diffusers or ComfyUI text encoder module, its path without a
    leading ``text_model``; None for another module."""
    if layout == "comfyui":
        encoder, _, inner = module.removeprefix(COMFY_TEXT_ENCODERS).partition(".")
        if not module.startswith(COMFY_TEXT_ENCODERS) or not inner.startswith(COMFY_TRANSFORMER):
            return None
        return encoder, inner.removeprefix(COMFY_TRANSFORMER).removeprefix(TEXT_MODEL + ".")
    if layout == "kohya":
        prefix = next((p for p in KOHYA_TEXT_ENCODERS if module.startswith(p)), None)
        if prefix is None:
            return None
        return KOHYA_TEXT_ENCODERS[prefix], module[len(prefix) :].removeprefix(TEXT_MODEL + "_")
    component, _, inner = module.partition(".")
    if component not in DIFFUSERS_TEXT_ENCODERS:
        return None
    return component, inner.removeprefix(TEXT_MODEL + ".")


def _denoiser_path(module: str, layout: str) -> str | None:
    """The path of a denoiser module after its component, in kohya's underscore form; None for a
    text encoder's module."""
    prefixes = {"kohya": KOHYA_DENOISER, "comfyui": COMFY_DENOISER}.get(layout, DIFFUSERS_DENOISER)
    prefix = next((p for p in prefixes if module.startswith(p)), None)
    return None if prefix is None else module[len(prefix) :].replace(".", "_")


def _family(module: str, rest: str) -> str:
    """The spelling of a module's blocks (:data:`FAMILIES`; ``transformer`` for every
    ``lora_transformer_`` module: diffusers' names; in ComfyUI's layout, :data:`WAN_FAMILIES` for Wan's
    block layers); "" outside the blocks."""
    if module.startswith("lora_transformer_"):
        return "transformer"
    if module.startswith(COMFY_DENOISER):
        wan = _WAN_BLOCK_RE.match(rest)
        if wan is not None and wan[2] in _WAN_BLOCK:
            return "wan"
        if wan is not None and wan[2] in _WAN_DIFFUSERS_BLOCK:
            return "wan_diffusers"
    return next(
        (name for name, (starts, _) in FAMILIES.items() if any(rest == s or rest.startswith(s + "_") for s in starts)),
        "",
    )


def _twin(
    paths: dict[str, str], families: dict[str, str], blocks: set[str], mixture: bool
) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Two modules of different spellings that name one layer, each with its spelling (a family of
    :data:`FAMILIES`, or "diffusers" outside the blocks): each module's path mapped onto diffusers'
    name(s) (a BFL or MMDiT fused qkv is three layers), a layer outside the blocks by the spelling of
    the file's blocks (the SGM embeddings also in a diffusers UNet file, which has no layer of those
    names; BFL's in a lora_unet_ + lora_transformer_ mixture)."""
    seen: dict[str, tuple[str, str]] = {}  # diffusers' name: (module, spelling)
    for module, rest in sorted(paths.items()):
        spelling, mapped = _diffusers_names(module, rest, families[module], blocks, mixture)
        shown = (families[module] or "diffusers") if spelling == "diffusers" else spelling  # for the message
        for name in mapped:
            other = seen.setdefault(name, (module, shown))
            if _kind(other[1]) != _kind(shown):
                return other, (module, shown)
    return None


def _kind(spelling: str) -> str:
    """A spelling, with diffusers' own (its UNet's and transformers' names) as one."""
    return "diffusers" if spelling in (*DIFFUSERS_FAMILIES, "diffusers") else spelling


def _diffusers_names(
    module: str, rest: str, family: str, blocks: set[str], mixture: bool
) -> tuple[str, tuple[str, ...]]:
    """``(spelling, names)``: the spelling a module is in ("diffusers" for diffusers' own names) and
    diffusers' names (kohya's underscore form) of the layer(s) it adapts."""
    if family == "sgm" or (not family and rest in _SGM_WHOLE and blocks & {"sgm", "unet"}):
        return "sgm", (_sgm_to_diffusers(rest),)
    bfl = "bfl" in blocks or (mixture and module.startswith("lora_unet_"))
    if family == "bfl" or (not family and rest in _BFL_WHOLE and bfl):
        return "bfl", _bfl_to_diffusers(rest)
    if family == "mmdit" or (not family and rest in _MMDIT_WHOLE and "mmdit" in blocks):
        return "mmdit", _mmdit_to_diffusers(rest)
    if family == "wan" or (not family and rest in _WAN_WHOLE and "wan" in blocks):
        return "wan", (_wan_to_diffusers(rest),)
    return "diffusers", (rest,)


def _wan_to_diffusers(rest: str) -> str:
    """A Wan module path (ComfyUI's layout) as diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` maps it."""
    if rest in _WAN_WHOLE:
        return _WAN_WHOLE[rest]
    m = _WAN_BLOCK_RE.match(rest)
    if m is None or m[2] not in _WAN_BLOCK:
        return rest
    return f"blocks_{m[1]}_{_WAN_BLOCK[m[2]]}"


def _sgm_to_diffusers(rest: str) -> str:
    """An SGM UNet module path as diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` and
    ``_convert_unet_lora_key`` map it (SD / SDXL: two layers a block)."""
    if rest in _SGM_WHOLE:
        return _SGM_WHOLE[rest]
    middle = _SGM_MIDDLE_RE.match(rest)
    if middle is not None:
        part, inner = _SGM_MIDDLE[int(middle[1])], middle[2] or ""
        return _joined(f"mid_block_{part}", _resnet_inner(inner) if part.startswith("resnets") else inner)
    m = _SGM_BLOCK_RE.match(rest)
    if m is None:
        return rest
    kind, i, j, inner = m[1], int(m[2]), int(m[3]), m[4] or ""
    per = _LAYERS_PER_BLOCK + 1
    if kind == "input_blocks":
        if i == 0:
            return "conv_in"
        block, layer = f"down_blocks_{(i - 1) // per}", (i - 1) % per
        if inner.startswith("op"):
            return f"{block}_downsamplers_0_conv"
    else:  # output_blocks: an upsampler is the block's last part (SD 1.x's first up block has no attentions)
        block, layer = f"up_blocks_{i // per}", i % per
        if j == 2 or (j == 1 and inner == "conv"):
            return f"{block}_upsamplers_0_conv"
    if j == 0:
        return _joined(f"{block}_resnets_{layer}", _resnet_inner(inner))
    return _joined(f"{block}_attentions_{layer}", inner)


def _resnet_inner(inner: str) -> str:
    for sgm, diffusers in _RESNET_PARTS:
        if inner == sgm:
            return diffusers
    return "conv_shortcut" if inner == "skip_connection" else inner


def _joined(head: str, inner: str) -> str:
    return f"{head}_{inner}" if inner else head


def _bfl_to_diffusers(rest: str) -> tuple[str, ...]:
    return _blocks_to_diffusers(rest, _BFL_WHOLE, _BFL_BLOCK_RE, _BFL_BLOCKS)


def _mmdit_to_diffusers(rest: str) -> tuple[str, ...]:
    return _blocks_to_diffusers(rest, _MMDIT_WHOLE, _MMDIT_BLOCK_RE, _MMDIT_BLOCKS)


Blocks = dict[str, tuple[str, dict[str, tuple[str, ...]]]]  # a block kind: diffusers' block and its table


def _blocks_to_diffusers(rest: str, whole: dict[str, str], pattern: re.Pattern[str], blocks: Blocks) -> tuple[str, ...]:
    """diffusers' names of a transformer module of another spelling: a whole layer by ``whole``, a
    block's (``pattern``: its kind, index and inner path) by the kind's diffusers block and table."""
    if rest in whole:
        return (whole[rest],)
    m = pattern.match(rest)
    if m is None:
        return (rest,)
    block, table = blocks[m[1]]
    return tuple(f"{block}_{m[2]}_{part}" for part in table.get(m[3], (m[3],)))


def _spelled(family: str, module: str) -> str:
    if module.startswith("lora_transformer_"):
        return "diffusers' names under lora_transformer_"
    if family in FAMILIES:
        return FAMILIES[family][1]
    if family in WAN_FAMILIES:
        return WAN_FAMILIES[family]
    if family == "diffusers":
        return "diffusers' names"
    return "sd-scripts' names under lora_unet_" if module.startswith("lora_unet_") else "another spelling"


def _who_drops(first: str, second: str, mixture: bool, layout: str) -> str:
    """What the loaders do with a file (of ``layout``) of the two spellings ``first`` and ``second``."""
    if layout == "comfyui":
        return (
            "ComfyUI maps diffusion_model. keys onto its model's own names, so it applies only the spelling its "
            "model has and leaves the other unloaded, while clair would audit each spelling as a module of its own"
        )
    if {first, second} == {"sgm", "unet"}:
        return "diffusers loads only the diffusers-named modules of such a file and drops the SGM ones"
    if mixture:
        return "diffusers' Flux loader drops every lora_unet_ module of a file that has lora_transformer_ ones"
    return "clair would audit each spelling as a module of its own, which no loader applies as such"


# diffusers' Stable Diffusion / SDXL loader (StableDiffusionLoraLoaderMixin.lora_state_dict), for a file of
# lora_unet_ / lora_te*_ keys only: SGM blocks remapped by _maybe_map_sgm_blocks_to_diffusers (two layers
# a block), then every lora_unet_ key renamed by _convert_unet_lora_key, whose string replacements send
# several kohya names onto one layer (in_layers_2 and conv1, emb_layers_1 and time_emb_proj,
# skip_connection and conv_shortcut, op and conv in a downsampler...): diffusers keeps the later key
# and drops the other. Mirrored here, replacement for replacement (diffusers 0.42).
_SGM_PATTERNS = ("input_blocks", "middle_block", "output_blocks")
_SGM_INNER = ("resnets", "attentions", "upsamplers")
_SGM_MIDDLE_PARTS = (("resnets", "0"), ("attentions", "0"), ("resnets", "1"))
_UNET_RENAMES = (
    ("input.blocks.0.0", "conv_in"),
    ("out.2", "conv_out"),
    ("input.blocks", "down_blocks"),
    ("down.blocks", "down_blocks"),
    ("middle.block", "mid_block"),
    ("mid.block", "mid_block"),
    ("output.blocks", "up_blocks"),
    ("up.blocks", "up_blocks"),
    ("transformer.blocks", "transformer_blocks"),
    ("to.q.lora", "to_q_lora"),
    ("to.k.lora", "to_k_lora"),
    ("to.v.lora", "to_v_lora"),
    ("to.out.0.lora", "to_out_lora"),
    ("proj.in", "proj_in"),
    ("proj.out", "proj_out"),
    ("emb.layers", "time_emb_proj"),
    ("conv.in", "conv_in"),
    ("conv.out", "conv_out"),
    ("time.embed.0", "time_embedding.linear_1"),
    ("time.embed.2", "time_embedding.linear_2"),
    ("label.emb.0.0", "add_embedding.linear_1"),
    ("label.emb.0.2", "add_embedding.linear_2"),
    ("time.embedding.linear.1", "time_embedding.linear_1"),
    ("time.embedding.linear.2", "time_embedding.linear_2"),
)
# The SD UNet's time embedding under diffusers' and SGM's names, with an index after it that diffusers' loader
# drops (time_embedding_linear_1_0 is time_embedding.linear_1): an SD UNet's layers without its blocks.
_SD_TIME_EMBEDDING = ("time_embedding_linear_1_", "time_embedding_linear_2_", "time_embed_0_", "time_embed_2_")
_LAST_INDEX_RE = re.compile(r"\.\d+(?=\D*$)")
# The processor-era names _convert_unet_lora_key leaves, as diffusers' PEFT conversion reads them
# (UNET_TO_DIFFUSERS, with ".processor." dropped).
_UNET_TO_PEFT = (
    (".to_out_lora.down", ".to_out.0.lora_A"),
    (".to_q_lora.down", ".to_q.lora_A"),
    (".to_k_lora.down", ".to_k.lora_A"),
    (".to_v_lora.down", ".to_v.lora_A"),
    (".lora.down", ".lora_A"),
    (".processor.", "."),
)
_DOWN = ".lora_down.weight"
SD_LOADER_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def _refuse_sd_aliases(path: Path, names: list[str], paths: dict[str, str], blocks: set[str]) -> None:
    """Refuse two ``lora_unet_`` modules that diffusers' SD / SDXL loader maps onto one UNet layer.

    Only a file that loader reads: every key one of :data:`SD_LOADER_PREFIXES`, and UNet blocks
    (SGM or diffusers names), SGM's layers outside them or the time embedding with an index after it
    (:data:`_SD_TIME_EMBEDDING`), no Flux or SD3 blocks (their loaders map names one by one).
    """
    if not names or not all(m.startswith(SD_LOADER_PREFIXES) for m in names) or blocks - {"sgm", "unet"}:
        return
    unet = sorted(m for m in paths if m.startswith("lora_unet_"))
    if not blocks and not any(paths[m] in _SGM_WHOLE or paths[m].startswith(_SD_TIME_EMBEDDING) for m in unet):
        return
    seen: dict[str, str] = {}
    for module, key in _sgm_remapped([m + _DOWN for m in unet]).items():
        layer = sd_unet_layer(key)
        if layer is None:
            continue
        other = seen.setdefault(layer, module)
        if other != module:
            raise AdapterFormatError(
                f"{printable(str(path))}: modules {printable(other)!r} and {printable(module)!r} name one UNet "
                f"layer, {printable(layer)!r}, as diffusers' Stable Diffusion / SDXL loader maps kohya names "
                "(_convert_unet_lora_key): the two are one key to it, which keeps the later tensor and drops the "
                "other, while clair would audit each as a module of its own",
                hint="Keep one name for each layer and save the file again.",
            )


def _sgm_remapped(keys: list[str]) -> dict[str, str]:
    """``{module: key}``: each ``lora_unet_`` key as diffusers' ``_maybe_map_sgm_blocks_to_diffusers``
    renames it (SD / SDXL: two layers a block; a block's keys found by substring, the lowest index first)."""
    modules = {key: key.removesuffix(_DOWN) for key in keys}
    if not any(p in key for key in keys for p in _SGM_PATTERNS):
        return {m: key for key, m in modules.items()}
    out: dict[str, str] = {}
    ids: dict[str, set[int]] = {p: set() for p in _SGM_PATTERNS}
    for key in keys:
        if "text" in key or not any(p in key for p in _SGM_PATTERNS) or "input_blocks_0_0" in key:
            out[modules[key]] = key
            continue
        head = key.split("_")[4]
        pattern = next(p for p in _SGM_PATTERNS if p in key)
        if head.isdigit() and len(head) < 10:  # diffusers refuses a file of other indices
            ids[pattern].add(int(head))
    for pattern in _SGM_PATTERNS:
        for i in sorted(ids[pattern]):
            for key in keys:
                # The block's own index (diffusers tests a substring, so that input_blocks_1 also takes
                # input_blocks_10 and 11 and then fails on the file; ComfyUI and A1111 read it right).
                if pattern not in key or key.split("_")[4] != str(i) or modules[key] in out:
                    continue
                parts = key.split("_")
                if pattern == "middle_block":
                    if i > 2:
                        continue
                    new = [*parts[:4], *_SGM_MIDDLE_PARTS[i], *parts[5:]]
                else:
                    inner = parts[5] if len(parts) > 5 else ""
                    if not (inner.isdigit() and int(inner) < len(_SGM_INNER)):
                        continue
                    new = _sgm_block_key(parts, pattern, i, int(inner), "op" in key)
                out[modules[key]] = "_".join(new)
    return out


def _sgm_block_key(parts: list[str], pattern: str, i: int, inner: int, op: bool) -> list[str]:
    per = _LAYERS_PER_BLOCK + 1
    if pattern == "input_blocks":
        block, layer = (i - 1) // per, (i - 1) % per
        kind, index = ("downsamplers", "0") if op else (_SGM_INNER[inner], str(layer))
    else:
        block, layer = i // per, i % per
        kind, index = _SGM_INNER[inner], str(layer) if inner < 2 else "0"
    return [*parts[:4], str(block), kind, index, *parts[6:]]


def sd_unet_layer(key: str) -> str | None:
    """The UNet layer diffusers' SD / SDXL loader loads a ``lora_unet_`` module's ``lora_down`` key
    (after the SGM remap) into: ``_convert_unet_lora_key``, then its PEFT conversion; None where that
    conversion drops an index no layer goes without (``add_embedding_linear_1`` and ``_2`` both become
    ``add.embedding.linear``, which diffusers loads into no layer)."""
    name = key.replace("lora_unet_", "").replace("_", ".")
    for old, new in _UNET_RENAMES:
        name = name.replace(old, new)
    if "emb" in name and "time.emb.proj" not in name:  # diffusers' "SDXL specific conversions"
        name, stripped = _LAST_INDEX_RE.subn("", name, count=1)
        # an index dropped from a resnet's emb_layers, or after the time embedding's linear_1 / linear_2
        # (time_embedding_linear_1_0, time_embed_0_5 are time_embedding.linear_1 to diffusers): a layer; from
        # another name, none (add_embedding_linear_1 and _2 both become add.embedding.linear, no layer of the UNet)
        if stripped and not name.endswith("time_emb_proj.lora.down.weight") and not name.startswith("time_embedding."):
            return None
    if ".in." in name:
        name = name.replace("in.layers.2", "conv1")
    if ".out." in name:
        name = name.replace("out.layers.3", "conv2")
    if "downsamplers" in name or "upsamplers" in name:
        name = name.replace("op", "conv")
    if "skip" in name:
        name = name.replace("skip.connection", "conv_shortcut")
    name = name.replace("time.emb.proj", "time_emb_proj").replace("conv.shortcut", "conv_shortcut")
    if "transformer_blocks" in name:
        name = name.replace("attn1", "attn1.processor").replace("attn2", "attn2.processor")
    for old, new in _UNET_TO_PEFT:
        name = name.replace(old, new)
    return name.removesuffix(".lora_A.weight")


def sd_unlayered(modules: Iterable[str]) -> list[str]:
    """The ``lora_unet_`` modules of a kohya file that diffusers' SD / SDXL loader applies to no layer
    (:func:`sd_unet_layer` after the SGM remap): SDXL's ``add_embedding_linear_1`` / ``_2`` (and a UNet's
    ``class_embedding_linear_1`` / ``_2``), which ``_convert_unet_lora_key`` turns into one name of no layer."""
    unet = sorted(m for m in modules if m.startswith("lora_unet_"))
    return sorted(m for m, key in _sgm_remapped([m + _DOWN for m in unet]).items() if sd_unet_layer(key) is None)


def kohya_loader(modules: Iterable[str]) -> str:
    """Which of diffusers' loaders reads a kohya file, told by its module names: ``"sd"`` (Stable
    Diffusion / SDXL: ``lora_unet_`` / ``lora_te*_`` names only, UNet blocks or none), ``"flux"``
    (sd-scripts' Flux: Black Forest Labs blocks under ``lora_unet_``), ``"flux_transformer"``
    (``lora_transformer_``: diffusers' Flux names) or ``""`` (another model's)."""
    names = list(modules)
    if any(m.startswith("lora_transformer_") for m in names):
        return "flux_transformer"
    blocks = {_family(m, rest) for m in names if (rest := _denoiser_path(m, "kohya")) is not None} - {""}
    if "bfl" in blocks:
        return "flux"
    if blocks <= {"sgm", "unet"} and all(m.startswith(SD_LOADER_PREFIXES) for m in names):
        return "sd"
    return ""


def bfl_outside_blocks(modules: Iterable[str]) -> list[str]:
    """The ``lora_unet_`` modules of an sd-scripts Flux file outside its blocks (``img_in``, ``txt_in``,
    ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``): diffusers' Flux loader (0.42) converts
    them without the ``transformer.`` prefix and drops them (``_convert_sd_scripts_to_ai_toolkit``)."""
    return sorted(m for m in modules if m.startswith("lora_unet_") and m.removeprefix("lora_unet_") in _BFL_WHOLE)
