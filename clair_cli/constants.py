"""File names, key patterns and limits, in one place (as peft's ``utils/constants.py``)."""

from __future__ import annotations

import os
import re

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_CARD_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)

# Pickle-based checkpoints are never unpickled: refused with a conversion hint.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# PEFT prefixes every key with the wrapper path of its LoraModel.
PEFT_KEY_PREFIX = "base_model.model."

# `<module>.lora_A.weight`, `<module>.lora_B.weight` (Linear, Conv), or
# `<module>.lora_embedding_A` / `_B` (Embedding); an adapter name may remain in
# hand-made files (`<module>.lora_A.default.weight`).
LORA_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?!weight$|bias$)(?P<adapter>[A-Za-z0-9_\-]+))?(?P<suffix>\.weight|\.bias)?$"
)
DORA_MAGNITUDE_RE = re.compile(r"^(?P<module>.+?)\.lora_magnitude_vector(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")

# MLX-LM's LoRA adapters (mlx_lm.lora; clair_cli.io.mlx): adapters.safetensors with `<module>.lora_a`
# (in x r) and `<module>.lora_b` (r x out), beside a config whose lora_parameters give one rank and scale.
MLX_WEIGHTS_NAME = "adapters.safetensors"
MLX_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<part>lora_a|lora_b)$")

# Diffusion LoRA files (docs/usage/sources.md, "Diffusion LoRA files"). diffusers' save_lora_weights
# writes this file name, and load_lora_weights(DIR) looks for it; clair writes it for both layouts.
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

# What diffusers' load_lora_weights(DIR or repo) loads when no weight_name is given
# (diffusers.loaders.lora_base._best_guess_weight_name): the first name that ends with
# DIFFUSERS_WEIGHTS_NAME and holds none of these words, in directory (or Hub listing) order.
DIFFUSERS_GUESS_SKIPPED = ("scheduler", "optimizer", "checkpoint")
# diffusers keeps each component's LoraConfig (as JSON, keys "<component>.<field>") under this
# safetensors metadata key (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# The pipeline components a diffusers LoRA file names first (unet.<module>.lora_A.weight).
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")
# kohya / sd-scripts: "lora_unet_<module path with _>.lora_down.weight", ".lora_up.weight", ".alpha";
# lora_te_ / lora_te1_ / lora_te2_ for the text encoders (SDXL has two), lora_transformer_ (Flux, SD3).
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
KOHYA_KEY_RE = re.compile(
    r"^(?P<module>lora_(?:unet|te[123]?|transformer)_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
# Textual-inversion embeddings bundled in a kohya file, as A1111 reads them (extensions-builtin/Lora/networks.py:
# "bundle_emb.<embedding>.<vector>", the vector "string_to_param.*" for SD, "clip_l" / "clip_g" for SDXL).
# A1111 loads them as embeddings beside the LoRA; sd-scripts (create_network_from_weights reads lora_down /
# alpha keys alone, load_weights is not strict) and ComfyUI (a "lora key not loaded" warning) skip them.
KOHYA_BUNDLE_PREFIX = "bundle_emb."
KOHYA_BUNDLE_RE = re.compile(r"^bundle_emb\.[^.]+\..+$")
# How messages name each file layout (clair_cli.io.diffusion).
LAYOUT_NAMES = {"peft": "PEFT", "kohya": "kohya", "comfyui": "ComfyUI", "diffusers": "diffusers", "mlx": "MLX-LM"}
# ComfyUI's layout (and musubi-tuner's, ai-toolkit's for Wan, Qwen-Image, HunyuanVideo, Flux): the original
# checkpoint's module names after "diffusion_model." (and a text encoder's after "text_encoders.", as ComfyUI's
# LoraSave writes them), PEFT's or kohya's factor names, an optional alpha; LoraSave's bias and norm
# differences (diff_b, diff) beside them.
COMFY_PREFIX = "diffusion_model."
COMFY_PREFIXES = (COMFY_PREFIX, "text_encoders.")
COMFY_KEY_RE = re.compile(
    r"^(?P<module>(?:diffusion_model|text_encoders)(?:\.[A-Za-z0-9_]+)+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha|diff|diff_b)$"
)

# Bounds on one safetensors file's header (docs/usage/sources.md, "Limits"): safetensors itself allows a
# 100 MB header; an adapter's is a few hundred KB (a 70B model's LoRA on every linear layer
# has ~1,100 tensors), so 16 MiB and 100,000 tensors leave room for MoE expert LoRAs while
# bounding the time and memory one upload can cost.
SAFETENSORS_MAX_HEADER = 16 * 1024 * 1024
SAFETENSORS_MAX_TENSORS = 100_000
MAX_KEY_LENGTH = 1024  # characters of one tensor name
MAX_NDIM = 8
MAX_DIM = 2**31  # one dimension of a tensor
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_CONFIG_BYTES = 10 * 1024 * 1024
# Highest LoRA rank accepted by default (--max-rank): the factored analysis holds a
# (summed rank)^2 Gram matrix per module (docs/usage/sources.md, "Limits").
DEFAULT_MAX_RANK = 1024
# Adapters accepted in one run by default (--max-adapters): the pool-level Gram matrices and
# the verdict's calibration cost time and memory that grow with the square of the pool
# (docs/usage/sources.md, "Limits": 2,000 tiny adapters take about 30 s and 2 GiB).
DEFAULT_MAX_ADAPTERS = 2048
# LoRA modules accepted in one adapter by default (--max-modules): the audit costs tens of
# milliseconds per module for a small pool on one core (28 ms measured for 10,000 modules), so
# 4,096 modules (every linear layer of a 405B dense model is 882; MoE expert LoRAs are more)
# bound a run to minutes. The header caps (100,000 tensors) would admit 50,000.
DEFAULT_MAX_MODULES = 4096
MAX_SOURCE_DEPTH = 32  # directory levels searched below a directory source
# A list of sources (@FILE or stdin): 2,048 adapters of 256-character paths fit 16 times over.
MAX_LIST_BYTES = 8 * 1024 * 1024
# The folders a Hugging Face Trainer saves during a run (transformers' PREFIX_CHECKPOINT_DIR).
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint-\d+$")

HUB_PREFIX = "hf://"
# Overall deadline of one hub source's downloads, config and weights together (CLAIR_HUB_TIMEOUT
# overrides it, up to a week), in seconds.
HUB_DEFAULT_TIMEOUT_S = 300.0
HUB_MAX_TIMEOUT_S = 7 * 24 * 3600.0
# The largest file a hub source may download: a LoRA of every linear layer of a 405B model at rank 256
# is about 20 GB in bfloat16 (a config file is bounded by MAX_CONFIG_BYTES). A Hub that announces or
# sends more is refused before it fills the disk.
HUB_MAX_FILE_BYTES = 32 * 2**30
HUB_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")

JSON_SCHEMA_VERSION = 1

EXIT_OK = 0
EXIT_FLAGGED = 1
EXIT_ERROR = 2

# clair writes its outputs with POSIX file locks and renames (clair_cli.io.writers).
POSIX_ONLY = "clair runs on Linux and macOS (POSIX systems); on Windows, run it under WSL 2"


def pickle_hint(name: str = "adapter_model.bin") -> str:
    """How to convert the pickle file ``name`` once, for a user who trusts it. A name that is
    not plain (letters, digits, ``._-``) is not put in the command a user may paste into a
    shell: ``FILE.pt`` stands for it."""
    stem, suffix = os.path.splitext(name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", name):
        stem, suffix = "FILE", suffix if re.fullmatch(r"\.[A-Za-z]{1,8}", suffix) else ""
    return (
        "clair never unpickles checkpoints. If you trust the file, convert it once with: "
        'python -c "import torch; from safetensors.torch import save_file; '
        f"save_file(torch.load('{stem}{suffix}', weights_only=True), '{stem}.safetensors')\""
    )


PICKLE_HINT = pickle_hint()

# Where ClairGroup.parse_args keeps the command's raw arguments (ctx.meta), for checks that
# parsing cannot make (gate --reference a b).
ARGV_KEY = "clair.argv"

# rank_pattern / alpha_pattern entries an adapter_config.json may hold (docs/usage/sources.md, Limits).
MAX_PATTERNS = 4096

# Bounded influence (clair_cli.core.influence): every merged update larger than this many times the
# collaborators' median norm, whole or on one module, is weighted down to count as one of that norm
# (widened where their norms spread). On by default in `clair merge` and in every federated round;
# the trained pools' honest clients reach 1.19x the median over all modules.
NORM_BOUND = 1.5

# The longest the main thread blocks in one wait for other threads or processes (a download, the
# workers' answers). A Ctrl-C or SIGTERM that does not interrupt such a wait (handled in C on another
# thread, or just before the wait blocked) does not wake it: CPython runs the Python handler
# (KeyboardInterrupt, Terminated) once the main thread is back in Python. In one wait, a Ctrl-C left
# `clair inspect` waiting out a whole download in 2 of 131 runs of tests/test_hub.py's interrupted
# download looped beside other tests; in slices (none of 70), such a signal waits one slice.
WAIT_SLICE_S = 0.25
