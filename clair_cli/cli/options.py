"""Option aliases shared by the commands, so every command spells them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Sources = Annotated[
    list[str],
    typer.Argument(
        help="Adapter directories, directories of adapters, .safetensors files, or hub ids (owner/name[@rev], hf://...).",
        show_default=False,
    ),
]
JsonOut = Annotated[
    Optional[str], typer.Option("--json", help="Write the JSON report to FILE ('-' for stdout).", metavar="FILE")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages; only errors and requested data.")]
Subfolder = Annotated[Optional[str], typer.Option("--subfolder", help="Subfolder inside hub repos.", metavar="PATH")]
ConfigFile = Annotated[
    Optional[Path],
    typer.Option("--config", help="adapter_config.json for .safetensors sources without one.", metavar="FILE"),
]
LoraAlpha = Annotated[
    Optional[float], typer.Option("--lora-alpha", help="lora_alpha for .safetensors sources without a config.")
]
Rslora = Annotated[bool, typer.Option("--rslora", help="With --lora-alpha: scale by alpha/sqrt(r).")]
BaseModel = Annotated[
    Optional[str], typer.Option("--base-model", help="Base model for sources whose config names none.")
]
