"""Diffusion LoRA files: kohya / sd-scripts and diffusers layouts, read as the same (A, B, scale) updates.

Three layouts besides PEFT's are recognised from a file's tensor names (never from its name):

- **kohya** (sd-scripts, A1111, ComfyUI): ``lora_unet_<path with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` per module; ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for
  the text encoders, ``lora_transformer_`` for Flux / SD3. ``lora_down`` is A, ``lora_up`` is B;
  the scale is alpha / rank, and a module without ``alpha`` has alpha = rank (scale 1), as
  sd-scripts and diffusers' ``_convert_non_diffusers_lora_to_diffusers`` read it.
- **diffusers** (``save_lora_weights``): ``unet.<module>.lora_A.weight`` /
  ``text_encoder.<module>.lora_B.weight`` / ``transformer.<module>...`` / ``prior.<module>...``,
  told by structure: a pipeline component first, PEFT's ``lora_A`` / ``lora_B`` after the module
  (``transformer.`` alone, also an LLM's module path, needs a module of diffusers' transformer
  models: ``transformer_blocks``, ``x_embedder``, an Attention's ``to_q`` ...). Each component's
  LoraConfig may be in the safetensors metadata (``lora_adapter_metadata``, keys
  ``<component>.<field>``), which diffusers then applies as is, per component (``use_rslora``
  included); without it diffusers gives every module alpha = rank (``get_peft_kwargs``), so clair
  reads scale 1 unless ``--lora-alpha`` says otherwise. A ``<module>.alpha`` tensor (SimpleTuner and
  others write them) gives its module alpha / rank, as diffusers' Flux loader applies it
  (``FluxLoraLoaderMixin.lora_state_dict``: ``network_alphas``); a file that diffusers refuses or reads
  two ways is refused: alphas beside a ``unet`` / ``prior`` / ``text_encoder_2`` / ``text_encoder_3``
  (Stable Diffusion, SDXL and SD3 refuse a key without "lora"), beside ``lora_adapter_metadata``,
  in some modules of a component and not others, or not stored as a float.
- **comfyui** (ComfyUI's own, and what musubi-tuner and ai-toolkit write for Wan, Qwen-Image,
  HunyuanVideo, Flux): ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight`` (or
  ``.lora_down.weight`` / ``.lora_up.weight``, one pair per module) and ``.alpha``, under the original
  checkpoint's module names; text encoders' modules under ``text_encoders.`` beside them, or alone in a
  text encoder's LoRA (ComfyUI's LoraSave). Each module's scale is its alpha / rank, and 1 (alpha = rank,
  or ``--lora-alpha``) without one, as ComfyUI applies them and diffusers 0.42's Wan, Qwen-Image and Flux loaders fold
  them into the factors (``lora_state_dict``). Bias and norm differences (``.diff_b``, one-dimensional
  ``.diff``), which LoraSave writes for every bias and norm, are left out with a note where they are
  zero and kept, not analysed, otherwise (as PEFT's LoRA biases); a ``.diff`` of a matrix is a full
  weight difference and refused, and so is a HunyuanVideo file's ``final_layer.adaLN_modulation.1`` of
  rank above 1, which diffusers' HunyuanVideo loader applies otherwise (:data:`HUNYUAN_SWAPPED`).

Module names are the file's own (``lora_unet_..._to_q``, ``unet.down_blocks...to_q``): adapters of
one layout compare module by module, and outputs keep each input's layout and keys. What is not a
plain LoRA (LyCORIS LoHa, LoKr, kohya's DoRA ``dora_scale``, Tucker cores, full differences, IA3, OFT,
norm tuning, in either layout; diffusers' old attention-processor keys) is refused with the file and
the key named (diffusers' DoRA ``lora_magnitude_vector`` is read, not analysed, with a note), and so
is a file that mixes layouts, names one layer under two spellings (``lora_te_X`` and
``lora_te1_X``, a text encoder's layer with and without ``text_model``, SGM and diffusers UNet names,
Black Forest Labs and diffusers Flux names, in a ComfyUI file Wan's own and diffusers' Wan names, two kohya
names that diffusers' Stable Diffusion loader maps onto one UNet layer: :mod:`clair_cli.io.spellings`),
or whose sd-scripts metadata (``ss_network_module``,
``ss_network_args``) says it is a network whose tensors are not a plain LoRA's (LyCORIS LoHa, LoKr,
IA3, GLoRA, OFT, BOFT, full, DoRA; sd-scripts' OFT) beside plain LoRA tensors (:func:`network_notes`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from clair_cli.constants import (
    COMFY_KEY_RE,
    COMFY_PREFIX,
    COMFY_PREFIXES,
    DIFFUSERS_COMPONENTS,
    DIFFUSERS_METADATA_KEY,
    FLOAT_DTYPES,
    KOHYA_BUNDLE_PREFIX,
    KOHYA_BUNDLE_RE,
    KOHYA_KEY_RE,
    KOHYA_PREFIXES,
    LAYOUT_NAMES,
    MLX_KEY_RE,
    PEFT_KEY_PREFIX,
)
from clair_cli.errors import AdapterFormatError, OutputError
from clair_cli.io.adapter import (
    FLOAT32_TINY,
    Adapter,
    HeaderKeys,
    check_module_count,
    classify_keys,
    has_subnormal,
)
from clair_cli.io.lora_config import exact_key
from clair_cli.io.paths import printable
from clair_cli.io.peft_config import parse_config
from clair_cli.io.safetensors_file import FileStamp, SafetensorsReader, TensorInfo
from clair_cli.io.spellings import bfl_outside_blocks, kohya_loader, refuse_two_spellings, sd_unlayered
from clair_cli.types import AdapterConfig, AdapterRef

if TYPE_CHECKING:
    from pathlib import Path

    from clair_cli.io.sources import SourceOptions

# LyCORIS and other kohya-style tensors that are not a plain LoRA's, by what their key holds.
VARIANTS = (
    ("hada_", "LoHa (hada_* tensors)"),
    ("lokr_", "LoKr (lokr_* tensors)"),
    ("dora_scale", "DoRA (dora_scale)"),
    ("lora_mid", "LoCon with a Tucker core (lora_mid)"),
    ("diff", "a full weight difference (diff)"),
    ("on_input", "IA3 (on_input)"),
    ("oft_", "OFT (oft_* tensors)"),
    ("_norm", "norm tuning (w_norm / b_norm)"),
)
VARIANT_HINT = (
    "clair reads plain LoRA files only (lora_A / lora_B or lora_down / lora_up, alpha): a LyCORIS variant has "
    "no low-rank update B @ A to compare. Leave this file out of the pool."
)
# diffusers 0.42's Stable Diffusion / SDXL loader reads a kohya file's alphas into a LoraConfig whose
# alpha_pattern keys do not match attention modules (to_q / to_k / to_v / to_out, the text encoders'
# self_attn), nor, with transformers 5 (a CLIPTextModel without text_model, which those keys keep: SD's and
# SDXL's first text encoder), any of its modules: those get the file's most common alpha. Its Flux loader folds
# each module's own alpha into the factors (alpha = rank where none is stored), as clair reads them: no note there.
KOHYA_ALPHAS_NOTE = (
    "alphas differ between modules: clair reads each module's own, as sd-scripts, A1111 and ComfyUI do; "
    "diffusers' Stable Diffusion / SDXL loader (0.42) applies the most common alpha to attention modules (and, "
    "with transformers 5, to every module of a CLIPTextModel, the first text encoder) instead"
)
# LyCORIS tensors beside diffusers' names, by their last parts (a module path may hold "diff" or "_norm"):
# a Tucker core, full weight differences, IA3, OFT and norm tuning.
DIFFUSERS_VARIANT_RE = re.compile(r"\.(?P<tail>lora_mid|diff|diff_b|on_input|oft_\w+|[wb]_norm)(?:\.weight)?$")
# diffusers 0.42's Stable Diffusion / SDXL loader gives a kohya module without an alpha tensor the file's
# most common stored alpha when other modules store one (get_peft_kwargs' lora_alpha); sd-scripts, A1111,
# ComfyUI and diffusers' Flux loader read alpha = rank.
KOHYA_MISSING_ALPHAS_NOTE = (
    "{n} module(s) store no alpha (e.g. {example}): clair reads alpha = rank there (or --lora-alpha), as "
    "sd-scripts, A1111 and ComfyUI do; diffusers' Stable Diffusion / SDXL loader (0.42) gives them the file's "
    "most common stored alpha instead"
)
# diffusers' Flux loader reads a lora_transformer_ file (_convert_mixture_state_dict_to_diffusers) only
# with an alpha in every module: a KeyError otherwise.
KOHYA_TRANSFORMER_NO_ALPHA_NOTE = (
    "{n} module(s) store no alpha (e.g. {example}): clair reads alpha = rank there (or --lora-alpha), as "
    "sd-scripts, A1111 and ComfyUI do; diffusers' Flux loader (0.42) refuses a lora_transformer_ file without "
    "an alpha in every module"
)
# diffusers' Flux loader (0.42, _convert_sd_scripts_to_ai_toolkit) converts an sd-scripts Flux file's
# modules outside the blocks without the transformer. prefix, and drops them.
KOHYA_FLUX_OUTSIDE_NOTE = (
    "{n} module(s) outside Flux's blocks (e.g. {example}; img_in, txt_in, time_in, vector_in, guidance_in, "
    "final_layer): clair reads them as ComfyUI applies them; diffusers' Flux loader (0.42) does not apply them"
)
# diffusers' Stable Diffusion / SDXL loader (0.42, _convert_unet_lora_key) turns a kohya file's SDXL added-conditioning
# MLP under diffusers' names (lora_unet_add_embedding_linear_1 / _2; a UNet's class_embedding the same) into
# add.embedding.linear: it strips the last index of a name with "emb", which leaves one name for the two layers and
# no layer of the UNet. It applies neither, and refuses a file whose UNet LoRA has no other module (PEFT finds no
# target module). ComfyUI maps those names onto the layers (label_emb.0.0 / label_emb.0.2) and applies them; SGM's
# own names (lora_unet_label_emb_0_0 / _0_2) diffusers maps right.
KOHYA_SD_UNLAYERED_NOTE = (
    "{n} UNet module(s) that diffusers' Stable Diffusion / SDXL loader (0.42) applies to no layer ({listed}: it turns "
    "add_embedding_linear_1 and _2 into one name, add.embedding.linear, of no layer of the UNet){alone}; clair reads "
    "them as ComfyUI applies them (SDXL's label_emb.0.0 / 0.2), so the audit and a merge include them"
)
# sd-scripts' network for SDXL's two text encoders (networks/lora.py: LoRANetwork names their modules lora_te1_ /
# lora_te2_ when given two; create_network_from_weights and its generation scripts build it) and
# networks/sdxl_merge_lora.py --sd_model (a merge into the checkpoint) name the text encoders' modules lora_te1_ /
# lora_te2_ only: a lora_te_ module of an SDXL file matches no module there and is skipped without an error
# (load_state_dict with strict=False; the merge logs "no module found"). ComfyUI (model_lora_keys_clip) and diffusers
# (_convert_non_diffusers_lora_to_diffusers) apply lora_te_ to the first text encoder, as lora_te1_. An SDXL file:
# lora_te1_ / lora_te2_ modules, or UNet layers SD 1.x and 2.x lack (a second transformer block in an attention,
# label_emb; under SGM's or diffusers' names).
KOHYA_SDXL_TE_NOTE = (
    "{n} text-encoder module(s) named lora_te_ (e.g. {example}) in an SDXL file: clair reads them as ComfyUI and "
    "diffusers apply them, to the first text encoder; sd-scripts' SDXL network (and sdxl_merge_lora.py --sd_model) "
    "name that encoder's modules lora_te1_ and skip them"
)
_SDXL_ONLY_UNET = re.compile(r"^lora_unet_(?:.*_transformer_blocks_[1-9]|label_emb_|add_embedding_)")
KOHYA_SD_UNLAYERED_ALONE = ", and refuses a file whose UNet LoRA has no other module"
# diffusers' Flux loader (0.42) keeps only an sd-scripts Flux file's lora_unet_ / lora_te_ / lora_te1_ keys (the
# ComfyUI branch of _convert_kohya_flux_lora_to_diffusers): a T5's modules (lora_te2_ for OneTrainer, lora_te3_ for
# sd-scripts and ComfyUI) are dropped.
KOHYA_FLUX_T5_NOTE = (
    "{n} T5 text-encoder module(s) (lora_te2_ / lora_te3_, e.g. {example}): clair reads them as sd-scripts and "
    "ComfyUI apply them; diffusers' Flux loader (0.42) does not apply them"
)
# diffusers' Flux loader (0.42, FluxLoraLoaderMixin.lora_state_dict) reads a ComfyUI Flux file (Black Forest Labs'
# blocks under diffusion_model.) in the lora_down / lora_up spelling only, as an sd-scripts file (diffusion_model. ->
# lora_unet_, text_encoders.clip_l.transformer. -> lora_te_): it drops the modules outside the blocks, every text
# encoder's but CLIP-L's (T5) and text_projection modules; it applies no module of a lora_A / lora_B file.
COMFY_FLUX_DROPPED_NOTE = (
    "{n} module(s) that diffusers' Flux loader (0.42) does not apply (e.g. {example}; {what}): clair reads them as "
    "ComfyUI applies them"
)
COMFY_FLUX_AB_NOTE = (
    "diffusers' Flux loader (0.42) applies none of this file's modules: it reads a ComfyUI Flux file in the "
    "lora_down / lora_up spelling only; clair reads them as ComfyUI applies them"
)
COMFY_CLIP_L = "text_encoders.clip_l.transformer."
# diffusers' HunyuanVideo loader (0.42, _convert_hunyuan_video_lora_to_diffusers; a file with an img_attn_qkv key)
# swaps the halves of final_layer.adaLN_modulation.1's tensors into its norm_out.linear (BFL's shift, scale order is
# diffusers' scale, shift): right for lora_B's output rows, but it swaps lora_A's rank rows too, which pairs them
# with other columns of lora_B: another update than ComfyUI's B @ A at any rank above 1 (a pair of terms that cancel
# in B @ A need not cancel there).
HUNYUAN_SWAPPED = "final_layer.adaLN_modulation.1"
# diffusers 0.42 reads a kohya text encoder's attention modules in its old processor layout (q_proj ->
# to_q_lora), which its PEFT conversion (convert_state_dict_to_peft) recognises only when the text
# encoder also has an out_proj module (to_out_lora): without one, q_proj / k_proj / v_proj modules are
# dropped beside mlp modules, and the file is refused (Could not automatically infer state dict type)
# without them.
KOHYA_TE_ATTENTION_NOTE = (
    "{n} {component} attention module(s) (q_proj / k_proj / v_proj, e.g. {example}) in a text encoder with no "
    "out_proj module: clair reads them as sd-scripts, A1111 and ComfyUI apply them; diffusers (0.42) {what}"
)
# diffusers 0.42 loads a text encoder's LoRA of a diffusers file (PEFT's key names) through its old
# processor layout (convert_state_dict_to_diffusers, then convert_state_dict_to_peft), which tells that
# layout from a q_proj / k_proj / v_proj / out_proj module: a text encoder of other modules alone (fc1,
# fc2) has none, and diffusers refuses the whole file (Could not automatically infer state dict type).
# An --intersect merge of files diffusers loads can leave a text encoder so (diffusers_te_notes).
DIFFUSERS_TE_ATTENTION = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
DIFFUSERS_TE_NOTE = (
    "{what} {component} module(s) (e.g. {example}) but no attention module (q_proj / k_proj / v_proj / "
    "out_proj) of that text encoder: diffusers (0.42) refuses the file (Could not automatically infer "
    "state dict type); clair reads the modules as PEFT applies them"
)
# diffusers' attention-processor era keys (before its PEFT integration).
OLD_DIFFUSERS_RE = re.compile(r"[._]lora\.(down|up)\.|\.lora_linear_layer\.")
# Components that only a diffusers pipeline has: their keys alone say diffusers.
_MAIN_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
# "transformer." is also the top of LLM module paths (GPT-2, Falcon, BLOOM: transformer.h.N; MPT, DBRX:
# transformer.blocks.N; OpenELM: transformer.layers.N). A file of such keys is diffusers' when a module
# sits under a top-level module of diffusers' transformer models that no LLM has, or is a layer of
# diffusers' Attention / FeedForward (to_q ... to_out.0, add_q_proj, ff.net.0.proj): Flux, SD3, Wan
# (transformer.blocks.N.attn1.to_q), Lumina2 (transformer.layers.N.attention.to_q), HiDream, CogVideoX...
_DIFFUSERS_TRANSFORMER_TOPS = frozenset(
    {
        "transformer_blocks",
        "single_transformer_blocks",
        "double_stream_blocks",
        "single_stream_blocks",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "condition_embedder",
        "patch_embedding",
        "caption_projection",
        "noise_refiner",
        "context_refiner",
        "time_caption_embed",
        "proj_out",
        "norm_out",
    }
)
_DIFFUSERS_LAYER_RE = re.compile(
    r"\.(?:to_q|to_k|to_v|to_qkv|to_out\.0|to_add_out|add_q_proj|add_k_proj|add_v_proj|ff\.net\.0\.proj|ff\.net\.2|"
    r"ff_context\.net\.0\.proj|ff_context\.net\.2|ffn\.net\.0\.proj|ffn\.net\.2)\.[a-z]"
)


# sd-scripts records the network a file was trained as: ss_network_module (--network_module) and
# ss_network_args (--network_args, a JSON object of strings; train_network.py). LyCORIS's entry point
# for sd-scripts (lycoris.kohya.create_network) takes its algorithm from them: "algo", default "lora".
NETWORK_MODULE_KEY = "ss_network_module"
NETWORK_ARGS_KEY = "ss_network_args"
# LyCORIS algorithms whose modules are a plain LoRA's (LoConModule: lora_down / lora_up / alpha, conv too).
LYCORIS_PLAIN = frozenset({"lora", "locon"})
# What LyCORIS's other algorithms store (lycoris/modules/*.py): never lora_down / lora_up alone.
LYCORIS_VARIANTS = {
    "loha": "LoHa (hada_* tensors)",
    "lokr": "LoKr (lokr_* tensors)",
    "ia3": "IA3 (weight / on_input tensors)",
    "glora": "GLoRA (a1 / a2 / b1 / b2 tensors)",
    "full": "a full weight difference (diff / diff_b tensors)",
    "diag-oft": "OFT (oft_blocks tensors)",
    "boft": "BOFT (oft_blocks tensors)",
}
# sd-scripts' own networks that are not a plain LoRA (networks/oft.py, oft_flux.py; loha.py and
# lokr.py on its feature branches).
SD_SCRIPTS_VARIANTS = {
    "networks.oft": "OFT (oft_blocks tensors)",
    "networks.oft_flux": "OFT (oft_blocks tensors)",
    "networks.loha": "LoHa (hada_* tensors)",
    "networks.lokr": "LoKr (lokr_* tensors)",
}
# DyLoRA saves a plain lora_down / lora_up / alpha at its full rank (sd-scripts' networks/dylora.py
# DyLoRAModule.state_dict, LyCORIS' DyLoraModule.custom_state_dict), applied as alpha / rank by every loader.
DYLORA_NOTE = (
    "its metadata says DyLoRA ({said}): DyLoRA saves a plain LoRA at its full rank, read as sd-scripts, "
    "A1111, ComfyUI and diffusers apply it (alpha / rank)"
)
NETWORK_HINT = (
    "If the file was converted to a plain LoRA, correct or remove ss_network_module / ss_network_args in its "
    "metadata and save it again; otherwise it is not a LoRA clair can audit: leave it out of the pool."
)


# The tensor names of a ComfyUI file's parts, which its module names may not hold.
COMFY_PART_NAMES = frozenset({"lora_A", "lora_B", "lora_down", "lora_up", "alpha", "diff", "diff_b"})


def _bad(path: Path, problem: str, hint: str | None = None) -> AdapterFormatError:
    return AdapterFormatError(f"{printable(str(path))}: {problem}", hint=hint)


def layout_of(path: Path, tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> str:
    """The key layout of a weights file: ``kohya``, ``comfyui``, ``diffusers`` or ``peft`` (anything else).

    Raises:
        AdapterFormatError: the file mixes kohya, ComfyUI or diffusers keys with others.
    """
    names = sorted(tensors)
    # A ComfyUI file is told by its denoiser's prefix; its text encoders' keys may sit beside them.
    for layout, marks, prefixes in (
        ("kohya", KOHYA_PREFIXES, (*KOHYA_PREFIXES, KOHYA_BUNDLE_PREFIX)),  # embeddings beside the LoRA (A1111's)
        ("comfyui", (COMFY_PREFIX,), COMFY_PREFIXES),
    ):
        own = [k for k in names if k.startswith(marks)]
        if own:
            other = next((k for k in names if not k.startswith(prefixes)), None)
            if other is not None:
                raise _bad(
                    path,
                    f"mixes {LAYOUT_NAMES[layout]} keys ({printable(own[0])!r}) with others ({printable(other)!r}); "
                    "one file holds one LoRA in one layout",
                    hint="Save each LoRA in one layout (kohya's, ComfyUI's or diffusers').",
                )
            return layout
    # A text encoder's LoRA alone (ComfyUI's LoraSave given no model difference): every key under text_encoders.,
    # which no PEFT or diffusers file has (ComfyUI applies its alphas; PEFT has no such keys).
    if names and all(k.startswith(COMFY_PREFIXES[1]) for k in names):
        return "comfyui"
    if any(MLX_KEY_RE.match(k) for k in names):
        return "mlx"  # MLX-LM's lora_a / lora_b (clair_cli.io.mlx), which no other layout spells so
    if any(k.startswith(PEFT_KEY_PREFIX) for k in names):
        return "peft"
    heads = {k.split(".", 1)[0] for k in names}
    if not heads & set(DIFFUSERS_COMPONENTS):
        return "peft"
    # "transformer." alone is also an LLM's module path (transformer.h.0...): diffusers only with evidence.
    evidence = bool(heads & set(_MAIN_COMPONENTS)) or DIFFUSERS_METADATA_KEY in metadata
    evidence = evidence or any(_diffusers_transformer_key(k) for k in names)
    if not evidence:
        return "peft"
    stray = next((k for k in names if k.split(".", 1)[0] not in DIFFUSERS_COMPONENTS), None)
    if stray is not None:
        raise _bad(
            path,
            f"mixes diffusers keys (component.module...) with {printable(stray)!r}; "
            "one file holds one LoRA in one layout",
            hint="Save the LoRA with diffusers' save_lora_weights().",
        )
    return "diffusers"


def _diffusers_transformer_key(key: str) -> bool:
    """Whether ``transformer.<...>`` is a tensor of a diffusers transformer model's module (see
    :data:`_DIFFUSERS_TRANSFORMER_TOPS`): a LoRA factor, or a LyCORIS tensor refused later as in a kohya file."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "transformer":
        return False
    return parts[1] in _DIFFUSERS_TRANSFORMER_TOPS or _DIFFUSERS_LAYER_RE.search(key) is not None


# diffusers' loaders that read a PEFT-format weights file (base_model.model. keys) of a diffusion transformer read
# the file alone, never its adapter_config.json: Flux.2's (Flux2LoraLoaderMixin), Krea 2's, ERNIE-Image's and, for
# fal's FLUX.1 Kontext LoRAs, Flux's (0.42). They give every module alpha = r (get_peft_kwargs): scale 1.
PEFT_DIFFUSION_BLOCKS = ("double_blocks.", "single_blocks.")  # Black Forest Labs' names
_UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")  # a UNet's: none of those loaders applies them
PEFT_DIFFUSION_SCALE = (
    "a diffusion transformer's PEFT adapter whose config scales {n} (e.g. {example}: {scale:g}): PEFT applies that "
    "scale, diffusers' loaders that read PEFT-format weights (Flux.2, Krea 2, ERNIE-Image, FLUX.1 Kontext; 0.42) "
    "read the weights file without adapter_config.json and apply scale 1 (alpha = r)"
)


def _diffusion_module(module: str) -> bool:
    """Whether a PEFT module name (without ``base_model.model.``) is a diffusion transformer's layer: one of
    diffusers' transformer blocks or layers, or of Black Forest Labs' blocks. A diffusers model's modules sit at
    its top level; a transformers model's under ``model.`` (or another top such as ``language_model.``), where
    an LLM may name a layer ``to_q`` too; a UNet's, none of those loaders applies."""
    if module.startswith(_UNET_BLOCKS) or module.startswith("model."):
        return False
    return module.startswith(PEFT_DIFFUSION_BLOCKS) or _diffusers_transformer_key(f"transformer.{module}.lora_A")


def diffusers_reads_peft(keys: Collection[str]) -> bool:
    """Whether a PEFT-layout weights file (its tensor ``keys``) is a diffusion transformer's adapter, which
    diffusers' loaders that read PEFT-format weights load (``base_model.model.`` keys of diffusers' transformer
    blocks and layers, or Black Forest Labs' blocks)."""
    prefix = "base_model.model."
    return any(k.startswith(prefix) and _diffusion_module(k[len(prefix) :]) for k in keys)


def peft_diffusion_scale(scales: Mapping[str, float], unprefixed: Collection[str]) -> str | None:
    """What diffusers applies otherwise than PEFT of a PEFT-layout adapter of a diffusion transformer (told by its
    module names: diffusers' transformer blocks and layers, Black Forest Labs' blocks): its modules of a scale other
    than 1 (``scales``: each module's PEFT scale; ``unprefixed``: modules stored without ``base_model.model.``,
    which those loaders do not read either). None for another adapter, or one of scale 1 throughout."""
    read = [m for m in scales if m not in unprefixed and not m.startswith(_UNET_BLOCKS) and not m.startswith("model.")]
    if not any(_diffusion_module(m) for m in read):
        return None
    other = sorted(m for m in read if not math.isclose(scales[m], 1.0, rel_tol=1e-6))
    if not other:
        return None
    n = f"{len(other)} module{'' if len(other) == 1 else 's'}"
    return PEFT_DIFFUSION_SCALE.format(n=n, example=printable(other[0]), scale=scales[other[0]])


def _refuse_variant(path: Path, key: str) -> AdapterFormatError:
    m = DIFFUSERS_VARIANT_RE.search(key)
    tail = m["tail"] if m else key.split(".", 1)[1] if "." in key else key
    what = next((name for marker, name in VARIANTS if marker in tail), None)
    if what is None:
        return _bad(
            path,
            f"tensor {printable(key)!r} is not a plain LoRA tensor (lora_A / lora_B or lora_down / lora_up, alpha)",
            hint=VARIANT_HINT,
        )
    return _bad(path, f"tensor {printable(key)!r} belongs to {what}, not a plain LoRA", hint=VARIANT_HINT)


def classify_kohya(path: Path, tensors: Mapping[str, TensorInfo]) -> tuple[HeaderKeys, dict[str, TensorInfo]]:
    """A kohya file's factors by module (``lora_down`` as ``lora_A``, ``lora_up`` as ``lora_B``) and its alphas;
    textual-inversion embeddings bundled beside them (``bundle_emb.<name>.<vector>``, which A1111 loads and
    sd-scripts and ComfyUI skip) are kept, not analysed.

    Raises:
        AdapterFormatError: a LyCORIS or other non-LoRA tensor, or an alpha without factors.
    """
    keys = HeaderKeys({}, [], [], [], [], layout="kohya")
    alphas: dict[str, TensorInfo] = {}
    for key, info in sorted(tensors.items()):
        if KOHYA_BUNDLE_RE.match(key):
            keys.embeddings.append(key)
            continue
        m = KOHYA_KEY_RE.match(key)
        if m is None:
            raise _refuse_variant(path, key)
        if m["part"] == "alpha":
            alphas[m["module"]] = info
        else:
            part = "lora_A" if m["part"].startswith("lora_down") else "lora_B"
            keys.parts.setdefault(m["module"], {})[part] = info
    _refuse_unpaired(path, keys, alphas, ("lora_down", "lora_up"))
    refuse_two_spellings(path, keys.parts, "kohya")
    return keys, alphas


def _refuse_unpaired(path: Path, keys: HeaderKeys, alphas: Mapping[str, object], names: tuple[str, str]) -> None:
    """Refuse an alpha of no module and a module with one factor (``names``: how the file calls A and B).

    Raises:
        AdapterFormatError: naming the alpha or the module.
    """
    orphan = sorted(set(alphas) - set(keys.parts))
    if orphan:
        raise _bad(path, f"{printable(orphan[0])}.alpha has no {names[0]} / {names[1]} tensors")
    for module, parts in sorted(keys.parts.items()):
        if len(parts) == 1:
            have, lack = names if "lora_A" in parts else names[::-1]
            raise _bad(path, f"module {printable(module)!r} has {have} but no {lack}")


def classify_comfy(
    path: Path, tensors: Mapping[str, TensorInfo]
) -> tuple[HeaderKeys, dict[str, TensorInfo], dict[str, TensorInfo]]:
    """A ComfyUI-layout file's factors by module (``lora_A`` / ``lora_B`` or ``lora_down`` / ``lora_up``),
    its alphas, and its bias and norm differences (``diff_b``, ``diff``: ComfyUI's LoraSave writes them,
    zeros where its source was a plain LoRA), by key.

    Raises:
        AdapterFormatError: a tensor that is not a plain LoRA's, a module name that holds a LoRA tensor's
            name, a factor stored under both spellings or a pair of two spellings (ComfyUI pairs ``lora_A``
            with ``lora_B`` only, ``lora_down`` with ``lora_up``), a module with one factor, an alpha
            without factors, or one layer under two spellings (:func:`refuse_two_spellings`).
    """
    keys = HeaderKeys({}, [], [], [], [], layout="comfyui")
    alphas: dict[str, TensorInfo] = {}
    diffs: dict[str, TensorInfo] = {}
    spellings: dict[str, set[str]] = {}
    for key, info in sorted(tensors.items()):
        m = COMFY_KEY_RE.match(key)
        if m is None:
            raise _refuse_variant(path, key)
        nested = next((p for p in m["module"].split(".") if p in COMFY_PART_NAMES), None)
        if nested is not None:
            raise _bad(path, f"tensor {printable(key)!r}: its module name holds {nested!r}, a LoRA tensor's name")
        if m["part"] in ("diff", "diff_b"):
            diffs[key] = info
            continue
        if m["part"] == "alpha":
            alphas[m["module"]] = info
            continue
        kohya = m["part"] in ("lora_down.weight", "lora_up.weight")
        part = "lora_A" if m["part"] in ("lora_A.weight", "lora_down.weight") else "lora_B"
        have = keys.parts.setdefault(m["module"], {})
        if part in have:
            raise _bad(
                path,
                f"module {printable(m['module'])!r} has two {part} tensors, {printable(have[part].name)!r} and "
                f"{printable(key)!r} (lora_A / lora_B and lora_down / lora_up spell one factor)",
                hint="Keep one spelling per module.",
            )
        have[part] = info
        spellings.setdefault(m["module"], set()).add("lora_down / lora_up" if kohya else "lora_A / lora_B")
    _refuse_unpaired(path, keys, alphas, ("lora_A", "lora_B"))
    for module, parts in sorted(keys.parts.items()):
        if len(spellings[module]) > 1:
            names = " and ".join(printable(info.name) for info in parts.values())
            raise _bad(
                path,
                f"module {printable(module)!r} pairs two spellings ({names}); ComfyUI pairs lora_A with lora_B "
                "and lora_down with lora_up, and reads neither factor of such a pair",
                hint="Keep one spelling per module.",
            )
    refuse_two_spellings(path, keys.parts, "comfyui")
    return keys, alphas, diffs


def _comfy_diffs(path: Path, keys: HeaderKeys, diffs: Mapping[str, TensorInfo]) -> list[str]:
    """Sort a ComfyUI file's bias and norm differences: all-zero ones carry nothing (ComfyUI's LoraSave
    writes them for every bias and norm of a model whose source was a plain LoRA) and are left out with
    a note; others are kept and not analysed, as PEFT's LoRA biases and full weights are (a merge asks
    for ``--drop-extras``).

    Raises:
        AdapterFormatError: a difference that is not one vector (a full weight difference).
    """
    zero = 0
    with SafetensorsReader(path) as reader:
        for key, info in sorted(diffs.items()):
            if len(info.shape) != 1:
                raise _bad(
                    path,
                    f"tensor {printable(key)!r} is a full weight difference of shape {list(info.shape)}, not a "
                    "plain LoRA",
                    hint=VARIANT_HINT,
                )
            if info.dtype not in FLOAT_DTYPES:
                raise _bad(path, f"tensor {printable(key)!r} has dtype {info.dtype}; a difference is a float")
            if not bool(reader.get(key).any()):
                zero += 1
            elif key.endswith(".diff_b"):
                keys.lora_biases.append(key)
            else:
                keys.others.append(key)
    if not zero:
        return []
    return [f"{zero} all-zero bias / norm difference(s) (diff_b / diff, as ComfyUI's LoraSave writes them): left out"]


FLOAT32_MAX = 3.4028234663852886e38  # float32's largest finite number
# What an alpha tensor may be stored as (float8 and bool are not read as a number here).
ALPHA_DTYPES = (*FLOAT_DTYPES, "I8", "I16", "I32", "I64", "U8")


# diffusers' Flux loader refuses an alpha tensor that is not floating point (FluxLoraLoaderMixin.lora_state_dict).
DIFFUSERS_ALPHA_DTYPES = FLOAT_DTYPES
# The components of a diffusers file whose alpha tensors diffusers reads: Flux's (FluxLoraLoaderMixin).
DIFFUSERS_ALPHA_COMPONENTS = ("transformer", "text_encoder")


def _alpha_values(
    path: Path, infos: Mapping[str, TensorInfo], dtypes: tuple[str, ...] = ALPHA_DTYPES
) -> dict[str, float]:
    """Each module's alpha (one number of ``dtypes``: a kohya file's may be floating point or
    integer, a diffusers file's floating point), checked finite and positive."""
    out: dict[str, float] = {}
    with SafetensorsReader(path) as reader:
        for module, info in infos.items():
            if info.numel != 1:
                raise _bad(path, f"{printable(info.name)!r} must be one number, got shape {list(info.shape)}")
            if info.dtype not in dtypes:
                allowed = f"a float ({', '.join(FLOAT_DTYPES)})"
                allowed += " or an integer (I8-I64, U8)" if dtypes == ALPHA_DTYPES else " (diffusers refuses others)"
                raise _bad(
                    path,
                    f"{printable(info.name)!r} has dtype {info.dtype}; an alpha is {allowed}",
                    hint="Save the alphas as float32 (sd-scripts does), or leave them out for alpha = rank.",
                )
            stored = reader.get(info.name)
            value = float(stored.reshape(-1)[0])
            if not math.isfinite(value) or value <= 0:
                # a subnormal alpha reads as 0.0 under the commands' flush to zero: say what is stored
                shown = "a subnormal number (below 1.2e-38)" if has_subnormal(stored) else str(value)
                raise _bad(
                    path,
                    f"{printable(info.name)!r} is {shown}; alpha must be a finite positive number",
                    hint="The file is corrupt or was written by a broken tool.",
                )
            if info.dtype == "F64" and not FLOAT32_TINY <= value <= FLOAT32_MAX:
                # sd-scripts casts an alpha to float32 (LoRAModule: alpha.float(), alpha == 0 -> lora_dim): 1e-50
                # becomes 0 and scale 1, 1e39 inf; ComfyUI, A1111 and diffusers read the float64 value (.item())
                raise _bad(
                    path,
                    f"{printable(info.name)!r} is {value:g} in float64, outside float32's range "
                    f"({FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}): sd-scripts casts an alpha to float32 (0 there "
                    "means alpha = rank, scale 1; past the range, Inf), ComfyUI, A1111 and diffusers apply the "
                    "float64 value, so the module's scale depends on the loader",
                    hint="Save the alphas as float32 (sd-scripts does), or leave them out for alpha = rank.",
                )
            out[module] = value
    return out


def module_config(
    base_model: str | None, modules: Mapping[str, tuple[int, float]], use_rslora: bool = False, use_dora: bool = False
) -> AdapterConfig:
    """An :class:`AdapterConfig` that gives each module its ``(rank, alpha)`` (exact patterns for the odd ones)."""
    ranks = Counter(r for r, _ in modules.values())
    r = min(ranks, key=lambda v: (-ranks[v], v)) if ranks else 1
    alphas = Counter(a for rk, a in modules.values() if rk == r)
    alpha = min(alphas, key=lambda v: (-alphas[v], v)) if alphas else float(r)
    return AdapterConfig(
        base_model=base_model,
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        rank_pattern={exact_key(m): rk for m, (rk, _) in sorted(modules.items()) if rk != r},
        alpha_pattern={exact_key(m): a for m, (_, a) in sorted(modules.items()) if a != alpha},
        use_dora=use_dora,
        exact=dict(modules),
    )


def _ranks(keys: HeaderKeys) -> dict[str, int]:
    """Each module's rank as its A factor's first dimension (checked later by :func:`_module_spec`)."""
    out = {}
    for module, parts in keys.parts.items():
        a = parts.get("lora_A", parts.get("lora_embedding_A"))
        if a is not None and a.shape and a.shape[0] > 0:
            out[module] = a.shape[0]
    return out


def _kohya_config(
    path: Path, tensors: Mapping[str, TensorInfo], options: SourceOptions
) -> tuple[HeaderKeys, AdapterConfig, dict[str, float]]:
    """The file's keys, its config, and the alphas it stores (modules without one are not in it)."""
    keys, alpha_infos = classify_kohya(path, tensors)
    check_module_count(path, len(keys.parts), options.max_modules)  # before reading an alpha
    alphas = _alpha_values(path, alpha_infos)
    default = options.lora_alpha
    modules = {m: (r, alphas.get(m, default if default is not None else float(r))) for m, r in _ranks(keys).items()}
    return keys, module_config(options.base_model, modules), alphas


def _comfy_config(
    path: Path, tensors: Mapping[str, TensorInfo], options: SourceOptions
) -> tuple[HeaderKeys, AdapterConfig, list[str]]:
    """A ComfyUI-layout file's keys, config (each module's alpha / rank where it stores an alpha,
    alpha = rank, or ``--lora-alpha``, where it does not) and notes."""
    keys, alpha_infos, diffs = classify_comfy(path, tensors)
    check_module_count(path, len(keys.parts), options.max_modules)  # before reading an alpha
    _refuse_hunyuan_swapped(path, keys)
    alphas = _alpha_values(path, alpha_infos)
    notes = [*_comfy_diffs(path, keys, diffs), *_comfy_flux_notes(keys.parts)]
    default = options.lora_alpha
    modules = {m: (r, alphas.get(m, default if default is not None else float(r))) for m, r in _ranks(keys).items()}
    return keys, module_config(options.base_model, modules), notes


def _refuse_hunyuan_swapped(path: Path, keys: HeaderKeys) -> None:
    """Refuse a HunyuanVideo file's ``final_layer.adaLN_modulation.1`` module of rank above 1, which
    diffusers' HunyuanVideo loader applies otherwise than ComfyUI (:data:`HUNYUAN_SWAPPED`).

    Raises:
        AdapterFormatError: naming the file and the module.
    """
    if not any("img_attn_qkv" in m for m in keys.parts):  # diffusers' test of a HunyuanVideo file
        return
    for module, rank in sorted(_ranks(keys).items()):
        if module.removeprefix(COMFY_PREFIX) == HUNYUAN_SWAPPED and rank > 1:
            raise _bad(
                path,
                f"module {printable(module)!r} (rank {rank}): diffusers' HunyuanVideo loader swaps the halves of both "
                "its factors into norm_out.linear (the scale / shift swap, right for lora_B's rows, also reorders "
                "lora_A's rank rows), so it applies another update than ComfyUI's B @ A, and clair cannot judge the "
                "two as one",
                hint="Remove this module's tensors from the file and save it again, or leave the file out of the pool.",
            )


def refuse_swapped_output(modules: Collection[str], name: str, rank: int) -> None:
    """Refuse to write a ComfyUI file's module that :func:`_refuse_hunyuan_swapped` refuses to read: a merge
    of rank-1 inputs is of a higher rank, which diffusers' HunyuanVideo loader applies otherwise than ComfyUI
    (``modules``: the file's modules; ``rank``: the one ``name`` would be written at).

    Raises:
        OutputError: naming the module and its rank; nothing is written.
    """
    if rank <= 1 or name.removeprefix(COMFY_PREFIX) != HUNYUAN_SWAPPED:
        return
    if not any("img_attn_qkv" in m for m in modules):
        return
    raise OutputError(
        f"the merged module {printable(name)!r} would have rank {rank}: diffusers' HunyuanVideo loader swaps the "
        "halves of both its factors into norm_out.linear (lora_A's rank rows too), so it would apply another update "
        "than ComfyUI's B @ A, and clair would refuse to read the file it wrote; nothing was written",
        hint="Remove this module's tensors from the inputs and merge again, or merge at --merge-rank 1.",
    )


def _comfy_flux_notes(modules: Mapping[str, Mapping[str, TensorInfo]]) -> list[str]:
    """What diffusers' Flux loader does not apply of a ComfyUI Flux file (:data:`COMFY_FLUX_DROPPED_NOTE`,
    :data:`COMFY_FLUX_AB_NOTE`). A Flux file has Black Forest Labs' blocks under ``diffusion_model.``, and
    not HunyuanVideo's fused ``img_attn_qkv`` / ``txt_attn_qkv`` (diffusers' HunyuanVideo loader reads
    those); one that mixes the two spellings diffusers refuses (no note)."""
    denoiser = {m: m.removeprefix(COMFY_PREFIX) for m in modules if m.startswith(COMFY_PREFIX)}
    if not any(p.startswith(("double_blocks.", "single_blocks.")) for p in denoiser.values()):
        return []
    if any("img_attn_qkv" in m or "txt_attn_qkv" in m for m in modules):
        return []
    down = {m for m, parts in modules.items() if any(i.name.endswith(".lora_down.weight") for i in parts.values())}
    if not down:
        return [COMFY_FLUX_AB_NOTE]
    if len(down) < len(modules):
        return []
    kohya = {"lora_unet_" + p.replace(".", "_"): m for m, p in denoiser.items()}
    outside = [kohya[k] for k in bfl_outside_blocks(kohya)]
    encoders = [m for m in modules if m.startswith("text_encoders.") and not m.startswith(COMFY_CLIP_L)]
    projections = [m for m in modules if m.startswith(COMFY_CLIP_L) and "text_projection" in m]
    what = [
        text
        for found, text in (
            (outside, "outside Flux's blocks: img_in, txt_in, time_in, vector_in, guidance_in, final_layer"),
            (encoders, "a text encoder other than clip_l, such as T5"),
            (projections, "clip_l's text_projection"),
        )
        if found
    ]
    dropped = sorted({*outside, *encoders, *projections})
    if not dropped:
        return []
    return [COMFY_FLUX_DROPPED_NOTE.format(n=len(dropped), example=printable(dropped[0]), what="; ".join(what))]


def _kohya_notes(modules: Mapping[str, object], stored: Mapping[str, float], config: AdapterConfig) -> list[str]:
    """Where diffusers' loader of a kohya file (:func:`kohya_loader`) applies it unlike clair (and
    sd-scripts, A1111, ComfyUI): alphas (:func:`_kohya_alpha_notes`), the modules of an sd-scripts Flux
    file outside its blocks and its T5 modules, text-encoder attention modules without out_proj."""
    loader = kohya_loader(modules)
    if loader == "sd":
        return [
            *_kohya_alpha_notes(stored, config),
            *_te_attention_notes(modules),
            *_sd_unlayered_notes(modules),
            *_sdxl_te_notes(modules),
        ]
    if loader == "flux":
        notes = _te_attention_notes(modules)
        outside = bfl_outside_blocks(modules)
        if outside:
            notes.insert(0, KOHYA_FLUX_OUTSIDE_NOTE.format(n=len(outside), example=printable(outside[0])))
        t5 = sorted(m for m in modules if m.startswith(("lora_te2_", "lora_te3_")))
        if t5:
            notes.append(KOHYA_FLUX_T5_NOTE.format(n=len(t5), example=printable(t5[0])))
        return notes
    missing = sorted(m for m in config.exact if m not in stored)
    if loader == "flux_transformer" and missing:
        return [KOHYA_TRANSFORMER_NO_ALPHA_NOTE.format(n=len(missing), example=printable(missing[0]))]
    return []


def diffusers_te_notes(modules: Collection[str], what: str = "it holds") -> list[str]:
    """Text encoders of a diffusers file (``modules``: its module names) that diffusers 0.42 refuses
    (:data:`DIFFUSERS_TE_NOTE`), one note each; ``what`` begins the note (an input's, a merged file's)."""
    notes = []
    for component in ("text_encoder", "text_encoder_2"):
        own = sorted(m for m in modules if m.startswith(component + "."))
        if own and not any(m.endswith(DIFFUSERS_TE_ATTENTION) for m in own):
            notes.append(
                DIFFUSERS_TE_NOTE.format(what=f"{what} {len(own)}", component=component, example=printable(own[0]))
            )
    return notes


def merged_diffusers_notes(layout: str, modules: Collection[str]) -> list[str]:
    """What of a merged diffusion file (its ``layout``, its ``modules``) diffusers 0.42 refuses or does not
    apply, as its inputs' notes say of theirs: text encoders (:func:`diffusers_te_notes`,
    :func:`_te_attention_notes`; ``--intersect`` can leave one so of inputs that diffusers loads) and UNet
    modules of no layer (:func:`_sd_unlayered_notes`; the merge writes them, as ComfyUI applies them), and
    ``lora_te_`` modules beside SDXL's that sd-scripts skips (:func:`_sdxl_te_notes`)."""
    if layout == "diffusers":
        return diffusers_te_notes(modules, "the merged file holds")
    loader = kohya_loader(modules) if layout == "kohya" else ""
    notes = _te_attention_notes(dict.fromkeys(modules)) if loader in ("sd", "flux") else []
    if loader == "sd":
        notes += _sd_unlayered_notes(modules) + _sdxl_te_notes(modules)
    return [f"the merged file: {n}" for n in notes]


def _sd_unlayered_notes(modules: Collection[str]) -> list[str]:
    """The UNet modules of a kohya file that diffusers' SD / SDXL loader applies to no layer
    (:data:`KOHYA_SD_UNLAYERED_NOTE`), in one note."""
    unlayered = sd_unlayered(modules)
    if not unlayered:
        return []
    listed = ", ".join(printable(m) for m in unlayered[:4]) + (", ..." if len(unlayered) > 4 else "")
    alone = all(m in unlayered for m in modules if m.startswith("lora_unet_"))
    return [
        KOHYA_SD_UNLAYERED_NOTE.format(n=len(unlayered), listed=listed, alone=KOHYA_SD_UNLAYERED_ALONE if alone else "")
    ]


def _sdxl_te_notes(modules: Collection[str]) -> list[str]:
    """An SDXL kohya file's ``lora_te_`` modules, which sd-scripts' SDXL network skips and ComfyUI and
    diffusers apply (:data:`KOHYA_SDXL_TE_NOTE`), in one note."""
    if not any(m.startswith(("lora_te1_", "lora_te2_")) or _SDXL_ONLY_UNET.match(m) for m in modules):
        return []
    plain = sorted(m for m in modules if m.startswith("lora_te_"))
    return [KOHYA_SDXL_TE_NOTE.format(n=len(plain), example=printable(plain[0]))] if plain else []


def _te_attention_notes(modules: Mapping[str, object]) -> list[str]:
    """Text encoders whose q_proj / k_proj / v_proj modules diffusers 0.42 does not apply (see
    :data:`KOHYA_TE_ATTENTION_NOTE`), one note each."""
    notes = []
    for component, prefixes in (("text_encoder", ("lora_te_", "lora_te1_")), ("text_encoder_2", ("lora_te2_",))):
        own = [m for m in modules if m.startswith(prefixes)]
        if any(m.endswith("out_proj") for m in own):
            continue
        attention = sorted(m for m in own if m.endswith(("q_proj", "k_proj", "v_proj")))
        if not attention:
            continue
        mlp = any("mlp" in m and "self_attn" not in m and "text_projection" not in m for m in own)
        what = "does not apply them" if mlp else "refuses the file (Could not automatically infer state dict type)"
        notes.append(
            KOHYA_TE_ATTENTION_NOTE.format(
                n=len(attention), component=component, example=printable(attention[0]), what=what
            )
        )
    return notes


def _kohya_alpha_notes(stored: Mapping[str, float], config: AdapterConfig) -> list[str]:
    """Where diffusers' Stable Diffusion / SDXL loader scales a kohya file's modules unlike clair (and
    sd-scripts, A1111, ComfyUI, diffusers' Flux loader).

    Only the alphas the file stores count: a file of no alpha tensors (clair's own merge of modules
    of several ranks) has alpha = rank everywhere in diffusers too.
    """
    notes = []
    if len(set(stored.values())) > 1:
        notes.append(KOHYA_ALPHAS_NOTE)
    missing = sorted(m for m in config.exact if m not in stored)
    if stored and missing:
        counts = Counter(stored.values())
        common = [a for a, c in counts.items() if c == max(counts.values())]
        if len(common) > 1 or any(config.exact[m][1] != common[0] for m in missing):
            notes.append(KOHYA_MISSING_ALPHAS_NOTE.format(n=len(missing), example=printable(missing[0])))
    return notes


def metadata_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, AdapterConfig]:
    """The LoraConfig of each component that diffusers' ``lora_adapter_metadata`` describes.

    Raises:
        AdapterFormatError: the metadata is not a JSON object of ``<component>.<field>`` keys, or a
            component's config is not a valid LoRA config.
    """
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return {}
    where = f"{printable(str(path))} ({DIFFUSERS_METADATA_KEY} metadata)"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"{DIFFUSERS_METADATA_KEY} metadata is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad(path, f"{DIFFUSERS_METADATA_KEY} metadata must be a JSON object")
    by_component: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        component, _, field = str(key).partition(".")
        if component in DIFFUSERS_COMPONENTS and field:
            by_component.setdefault(component, {})[field] = value
    return {c: parse_config(fields, f"{where}, {c}") for c, fields in sorted(by_component.items())}


def _diffusers_config(
    path: Path, keys: HeaderKeys, metadata: Mapping[str, str], options: SourceOptions, stored: Mapping[str, float]
) -> tuple[AdapterConfig, list[str]]:
    """The file's config (each module's rank and alpha, from its ``.alpha`` tensor (``stored``), or
    its component's LoraConfig in the metadata, else ``--lora-alpha`` or alpha = rank) and notes on
    how it was read.

    diffusers builds one LoraConfig per component, so components may differ in ``use_rslora``:
    each module then keeps its own component's rule, its alpha given in the file's rule (alpha/r):
    an rsLoRA module's alpha is read as ``alpha * sqrt(r)``, the same scale ``alpha / sqrt(r)``.
    """
    configs = metadata_configs(path, metadata)
    rslora = {c.use_rslora for c in configs.values()}
    # The file's rule: its configs' one rule; the flags' when it has none; alpha/r when they differ.
    use_rslora = options.use_rslora if not rslora else rslora == {True}
    default = options.lora_alpha
    modules: dict[str, tuple[int, float]] = {}
    for module, rank in _ranks(keys).items():
        component, _, inner = module.partition(".")
        config = configs.get(component)
        if module in stored:  # an alpha tensor, applied as alpha / r (beside metadata only where the two agree)
            alpha, own_rslora = stored[module], False
        elif config is not None:
            if config.rank_for(inner) != rank:
                raise _bad(
                    path,
                    f"module {printable(module)!r}: factors have rank {rank} but the {component} config in the "
                    f"metadata gives r={config.rank_for(inner)}; diffusers would refuse to load it",
                )
            alpha, own_rslora = config.alpha_for(inner), config.use_rslora
        elif default is not None:
            alpha, own_rslora = default, options.use_rslora
        else:  # diffusers' LoraConfig for a component without metadata: alpha = r, scale 1
            alpha, own_rslora = float(rank), False
        if own_rslora != use_rslora:  # the same scale in the file's rule
            alpha = alpha * math.sqrt(rank) if own_rslora else alpha / math.sqrt(rank)
        modules[module] = (rank, alpha)
    notes = []
    if len(rslora) > 1:
        scaled = ", ".join(f"{c}: alpha/sqrt(r)" if cfg.use_rslora else f"{c}: alpha/r" for c, cfg in configs.items())
        notes.append(
            f"its components' configs differ on use_rslora ({scaled}); clair scales each module by its own "
            "component's rule, as diffusers does (alphas shown in the alpha/r rule: an rsLoRA module's is "
            "alpha*sqrt(r))"
        )
    use_dora = any(c.use_dora for c in configs.values())
    return module_config(options.base_model, modules, use_rslora=use_rslora, use_dora=use_dora), notes


def _diffusers_keys(path: Path, tensors: Mapping[str, TensorInfo]) -> tuple[HeaderKeys, dict[str, TensorInfo]]:
    """A diffusers file's keys (refused: the old attention-processor layout, LyCORIS tensors, one layer
    under two spellings) and its ``<module>.alpha`` tensors by module.

    Raises:
        AdapterFormatError: what is refused, or an alpha tensor of no module.
    """
    old = next((k for k in sorted(tensors) if OLD_DIFFUSERS_RE.search(k)), None)
    if old is not None:
        raise _bad(
            path,
            f"tensor {printable(old)!r} is in diffusers' old attention-processor layout (lora.down / lora.up)",
            hint="Load it in diffusers (load_lora_weights) and save it again with save_lora_weights().",
        )
    keys = classify_keys(path, dict(tensors))
    variant = next(
        (
            k
            for k in sorted(keys.others)
            if any(marker in k for marker, _ in VARIANTS[:3]) or DIFFUSERS_VARIANT_RE.search(k)
        ),
        None,
    )
    if variant is not None:  # LyCORIS tensors under diffusers' component names, refused as in a kohya file
        raise _refuse_variant(path, variant)
    alphas: dict[str, TensorInfo] = {}
    for key in keys.others:
        if key.endswith(".alpha"):
            module = key.removesuffix(".alpha")
            if module not in keys.parts:
                raise _bad(path, f"{printable(key)!r} is an alpha without lora_A / lora_B tensors beside it")
            alphas[module] = tensors[key]
    keys.others = [k for k in keys.others if not (k.endswith(".alpha") and k.removesuffix(".alpha") in alphas)]
    keys.layout = "diffusers"
    refuse_two_spellings(path, keys.parts, "diffusers")
    return keys, alphas


def _diffusers_alphas(
    path: Path, keys: HeaderKeys, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> tuple[dict[str, float], list[str]]:
    """The alphas of a diffusers file's ``<module>.alpha`` tensors, read as diffusers 0.42 reads them.

    Only its Flux loader takes them from such a file (``FluxLoraLoaderMixin.lora_state_dict`` pops every
    alpha key into ``network_alphas``; ``get_peft_kwargs`` makes them ``lora_alpha`` / ``alpha_pattern``:
    scale alpha / r per module, the text encoder's too); the loaders of Stable Diffusion, SDXL, SD3, Wan...
    refuse a file with a key that lacks "lora" (``load_lora_weights``: "Invalid LoRA checkpoint"). A file
    that diffusers refuses, or reads in two ways, is refused.

    Raises:
        AdapterFormatError: alphas beside a component Flux has not, or beside lora_adapter_metadata; an
            alpha in some modules of a component but not in others; an alpha that is not one positive float.
    """
    if not infos:
        return {}, []
    example = printable(infos[min(infos)].name)
    components = sorted({m.partition(".")[0] for m in keys.parts})
    other = next((c for c in components if c not in DIFFUSERS_ALPHA_COMPONENTS), None)
    if other is not None:
        raise _bad(
            path,
            f"tensor {example!r} is an alpha tensor in a file with {other}. modules; diffusers reads alpha tensors in "
            f"a Flux LoRA only (transformer., text_encoder.), and its loaders of pipelines with a {other} refuse "
            "every key without 'lora' in it (Invalid LoRA checkpoint)",
            hint="Fold each alpha into its module (lora_B * alpha / r) and save the file without alpha tensors.",
        )
    for component in components:
        own = [m for m in keys.parts if m.partition(".")[0] == component]
        missing = sorted(m for m in own if m not in infos)
        if missing and len(missing) < len(own):
            raise _bad(
                path,
                f"{len(own) - len(missing)} {component} module(s) store an alpha tensor and {len(missing)} none (e.g. "
                f"{printable(missing[0])!r}); diffusers' Flux loader gives those another module's alpha (the first "
                "in the file), its Qwen-Image loader alpha = r, so their update depends on the loader",
                hint="Store an alpha for every module of the component, or for none.",
            )
    values = _alpha_values(path, infos, DIFFUSERS_ALPHA_DTYPES)
    if DIFFUSERS_METADATA_KEY in metadata:
        dtypes = {m: info.dtype for m, info in infos.items()}
        return values, [_alphas_beside_metadata(path, keys, values, metadata, dtypes)]
    note = (
        f"{len(values)} module(s) hold an alpha tensor: scaled by alpha / r, as diffusers' Flux loader applies them "
        "(diffusers' loaders of other pipelines, such as SD3 and Wan, refuse the file)"
    )
    return values, [note]


def _alphas_beside_metadata(
    path: Path, keys: HeaderKeys, values: Mapping[str, float], metadata: Mapping[str, str], dtypes: Mapping[str, str]
) -> str:
    """Alpha tensors beside ``lora_adapter_metadata`` (SimpleTuner's ComfyUI export writes both, its
    alphas taken from its LoraConfig, which it writes unprefixed for the transformer): read where the
    two agree on every module's rank and alpha (to the alpha tensor's precision: ``dtypes``, by
    module), as ComfyUI applies them (diffusers' Flux loader refuses such a file); refused where they
    do not, since which scale applies then depends on the loader. A module without both factors is
    left to the adapter's own checks, which name what it lacks.

    Raises:
        AdapterFormatError: a module's alpha tensor, or its rank, not what the metadata's config says.
    """
    configs = metadata_configs(path, metadata)
    flat = _flat_metadata_config(path, metadata)
    ranks = _ranks(keys)
    checked = 0
    for module, alpha in sorted(values.items()):
        component, _, inner = module.partition(".")
        config = configs.get(component, flat if component == "transformer" else None)
        rank = ranks.get(module)
        if config is None or rank is None:
            continue
        checked += 1
        said = config.alpha_for(inner) * (math.sqrt(rank) if config.use_rslora else 1.0)  # in alpha / r
        if config.rank_for(inner) != rank or not math.isclose(said, alpha, rel_tol=ALPHA_PRECISION[dtypes[module]]):
            raise _bad(
                path,
                f"module {printable(module)!r}: its alpha tensor says alpha={alpha:g} at rank {rank}, its "
                f"{DIFFUSERS_METADATA_KEY} config alpha={config.alpha_for(inner):g}, r={config.rank_for(inner)}"
                f"{', use_rslora' if config.use_rslora else ''}: two scales, and which one applies depends on the "
                "loader (diffusers' Flux loader refuses the two together, ComfyUI applies the tensor)",
                hint=f"Keep one: the alpha tensors or the LoraConfig in {DIFFUSERS_METADATA_KEY}.",
            )
    return (
        f"{len(values)} module(s) hold an alpha tensor ({checked} of them described by the {DIFFUSERS_METADATA_KEY} "
        "config too, which agrees): scaled by alpha / r, as ComfyUI applies them (diffusers' Flux loader refuses a "
        "file with both)"
    )


# How closely a stored alpha can match its config's value: the rounding of its dtype (half an ulp, relative).
ALPHA_PRECISION = {"F64": 1e-12, "F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}


def _flat_metadata_config(path: Path, metadata: Mapping[str, str]) -> AdapterConfig | None:
    """The LoraConfig of ``lora_adapter_metadata`` written without component prefixes (``r``,
    ``lora_alpha``, ... at the top level, as SimpleTuner's ComfyUI export writes it); None if none."""
    data = json.loads(metadata[DIFFUSERS_METADATA_KEY])  # valid: metadata_configs parsed it
    fields = {str(k): v for k, v in data.items() if "." not in str(k)}
    if "r" not in fields and "lora_alpha" not in fields:
        return None
    return parse_config(fields, f"{printable(str(path))} ({DIFFUSERS_METADATA_KEY} metadata)")


def open_diffusion(
    ref: AdapterRef,
    header: tuple[dict[str, TensorInfo], dict[str, str]],
    layout: str,
    options: SourceOptions,
    stamp: FileStamp,
) -> Adapter:
    """Open a kohya, ComfyUI or diffusers file (``layout``, from :func:`layout_of`) as an :class:`Adapter`
    (``stamp``: the file's, taken before ``header`` was read: :meth:`Adapter.open`).

    Raises:
        AdapterFormatError: a variant that is not a plain LoRA, a bad alpha, or what
            :meth:`Adapter.open` refuses.
    """
    path = ref.weights_file
    tensors, metadata = header
    notes: list[str] = []
    if layout == "kohya":
        keys, config, stored = _kohya_config(path, tensors, options)
        notes.extend(_kohya_notes(keys.parts, stored, config))
        notes.extend(split_qkv_notes(metadata, keys.parts))
    elif layout == "comfyui":
        keys, config, notes = _comfy_config(path, tensors, options)
    else:
        keys, alpha_infos = _diffusers_keys(path, tensors)
        check_module_count(path, len(keys.parts), options.max_modules)  # before reading an alpha
        alphas, notes = _diffusers_alphas(path, keys, alpha_infos, metadata)
        config, more = _diffusers_config(path, keys, metadata, options, alphas)
        notes.extend(more)
        notes.extend(diffusers_te_notes(keys.parts))
    notes.extend(network_notes(path, metadata, layout))
    adapter = Adapter.open(
        ref, config, max_rank=options.max_rank, max_modules=options.max_modules, header=header, keys=keys, stamp=stamp
    )
    adapter.notes.extend(notes)
    return adapter


# sd-scripts' Flux and HunyuanImage networks (networks/lora_flux.py, lora_hunyuan_image.py) with
# --network_args split_qkv=True train a double block's fused qkv as 3 LoRAs and a single block's linear1 as 4
# (q, k, v, mlp), each of rank dim scaled alpha / dim (LoRAModule.__init__, forward), and save each module
# fused (LoRANetwork.state_dict): lora_down of 3 or 4 times dim rows, a block-diagonal lora_up, the same alpha.
# Every loader, sd-scripts' own create_network_from_weights (which loads with split_qkv False) included,
# applies alpha / (3 or 4 dim): a third or a quarter of the update training saw (kohya-ss/sd-scripts#2204).
SPLIT_QKV_MODULES = frozenset({"networks.lora_flux", "networks.lora_hunyuan_image"})
SPLIT_QKV_NOTE = (
    "its metadata says sd-scripts' split_qkv ({said}): {n} fused module(s) (e.g. {example}) were trained as 3 "
    "(a double block's qkv) or 4 (a single block's linear1) LoRAs, each scaled alpha / its own rank, and saved "
    "fused with that alpha; clair reads them at alpha / the stored rank, as every loader applies them (sd-scripts' "
    "create_network_from_weights included), a third or a quarter of the update training saw "
    "(kohya-ss/sd-scripts#2204)"
)


def split_qkv_notes(metadata: Mapping[str, str], modules: Collection[str]) -> list[str]:
    """:data:`SPLIT_QKV_NOTE` for a kohya file whose sd-scripts metadata says split_qkv and that has fused
    modules (the names sd-scripts splits: ``double`` and ``qkv``, or ``single`` and ``linear1``)."""
    module = str(metadata.get(NETWORK_MODULE_KEY, "")).strip()
    if module not in SPLIT_QKV_MODULES:
        return []
    try:
        args = json.loads(metadata.get(NETWORK_ARGS_KEY) or "{}")
    except (ValueError, RecursionError):
        return []
    if not isinstance(args, dict) or str(args.get("split_qkv")) != "True":  # sd-scripts: split_qkv == "True"
        return []
    fused = sorted(m for m in modules if ("double" in m and "qkv" in m) or ("single" in m and "linear1" in m))
    if not fused:
        return []
    said = f"{NETWORK_MODULE_KEY} {_shown(module)!r}, {NETWORK_ARGS_KEY} split_qkv 'True'"
    return [SPLIT_QKV_NOTE.format(said=said, n=len(fused), example=printable(fused[0]))]


def _shown(value: object, limit: int = 60) -> str:
    text = str(value)
    return printable(text[:limit] + ("..." if len(text) > limit else ""))


def network_notes(path: Path, metadata: Mapping[str, str], layout: str) -> list[str]:
    """Check what the file's sd-scripts metadata says it is against its tensors, all a plain LoRA's
    (the variants' tensors are refused before): a DyLoRA is read, with a note; LoHa, LoKr, IA3, GLoRA,
    OFT, BOFT, a full difference, DoRA (LyCORIS ``dora_wd``) or an unknown LyCORIS algorithm is refused.

    Raises:
        AdapterFormatError: naming the file and the metadata that contradicts its tensors.
    """
    module = metadata.get(NETWORK_MODULE_KEY)
    if module is None:
        return []
    module = module.strip()
    said = f"{NETWORK_MODULE_KEY} {_shown(module)!r}"
    if module in SD_SCRIPTS_VARIANTS:
        raise _contradiction(path, SD_SCRIPTS_VARIANTS[module], said, layout)
    if module == "networks.dylora":
        return [DYLORA_NOTE.format(said=said)]
    if module.split(".")[0] != "lycoris":
        return []
    args = _network_args(path, metadata)
    algo = str(args.get("algo") or "lora").strip().lower()  # as lycoris.kohya.create_network reads it
    said += f", {NETWORK_ARGS_KEY} algo {_shown(algo)!r}"
    if algo == "dylora":
        return [DYLORA_NOTE.format(said=said)]
    if algo not in LYCORIS_PLAIN:
        what = LYCORIS_VARIANTS.get(algo, "a LyCORIS algorithm clair does not know")
        raise _contradiction(path, what, said, layout)
    if str(args.get("dora_wd", False)).lower() != "false":  # LyCORIS's str_bool
        said += f", dora_wd {_shown(args['dora_wd'])!r}"
        raise _contradiction(path, "DoRA (a dora_scale tensor in each module)", said, layout)
    return []


def _network_args(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(NETWORK_ARGS_KEY)
    if raw is None:
        return {}
    try:
        args = json.loads(raw)
    except (ValueError, RecursionError):
        args = None
    if not isinstance(args, dict):
        raise _bad(
            path,
            f"{NETWORK_MODULE_KEY} {_shown(metadata[NETWORK_MODULE_KEY])!r} names LyCORIS, but {NETWORK_ARGS_KEY} is "
            "not a JSON object, so which of its algorithms made the file cannot be told",
            hint=NETWORK_HINT,
        )
    return args


def _contradiction(path: Path, what: str, said: str, layout: str) -> AdapterFormatError:
    plain = {"kohya": "lora_down / lora_up / alpha", "comfyui": "lora_A / lora_B or lora_down / lora_up, alpha"}.get(
        layout, "lora_A / lora_B"
    )
    return _bad(
        path,
        f"its metadata says {what} ({said}), but its tensors are a plain LoRA's ({plain}): one of the two is "
        "wrong, and which update the file holds cannot be told",
        hint=NETWORK_HINT,
    )
