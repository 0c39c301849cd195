"""Write PEFT adapter directories atomically.

A merged adapter is a LoRA with scale 1 in every module; its config comes from
:mod:`clair_cli.io.lora_config`, the one writer of configs. Tensor names are PEFT's:
``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for
embeddings). A refined adapter keeps its source's config and every tensor of its
file; only the analysed factors change, as the pipeline computed them (this module
does no arithmetic).

Everything is written into a temporary directory beside the target and renamed
into place, so an interrupted run never leaves a half-written adapter; an
existing target is refused unless ``force`` is given. The target is checked by
:func:`clair_cli.io.paths.check_out_dir` (never an input, the current or home
directory, or the hub cache) and every name written inside it goes through
:func:`clair_cli.io.paths.join_inside`. The umask is honoured.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clair_cli.constants import CONFIG_NAME, MODEL_CARD_NAME, PEFT_KEY_PREFIX, SAFETENSORS_WEIGHTS_NAME
from clair_cli.errors import OutputError
from clair_cli.io.adapter import Adapter, ModuleSpec
from clair_cli.io.paths import apply_umask, check_out_dir, join_inside, printable, safe_relpath
from clair_cli.io.writers import os_error_text

if TYPE_CHECKING:
    import torch

TMP_SUFFIX = ".clair-tmp"
COMMITTED: list[Path] = []  # targets renamed into place by this process (for the interrupt message)
OLD_SUFFIX = ".clair-old"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class AtomicDir:
    """``with AtomicDir(target, force, inputs) as tmp:`` write into ``tmp``; it becomes ``target`` on success.

    ``inputs`` are the paths being read: the target may not be, contain or lie inside
    one (checked now, and again with :meth:`guard` once the sources are resolved).
    """

    def __init__(self, target: Path, force: bool = False, inputs: Iterable[Path] = ()) -> None:
        self.target = Path(target)
        self.force = force
        self.inputs: list[Path] = list(inputs)
        self.tmp: Path | None = None
        self.check()

    def guard(self, inputs: Iterable[Path | None]) -> None:
        """Add the files actually read (adapter files, hub cache files) and check again."""
        self.inputs += [p for p in inputs if p is not None]
        self.check()

    def _prefix(self) -> str:
        return f".{self.target.name}.{os.getpid()}."

    def check(self) -> None:
        """Refuse an unsafe target, an existing one without ``force`` and a missing parent, before any work."""
        shown = printable(str(self.target))
        check_out_dir(self.target, self.inputs)
        exists = os.path.lexists(self.target)
        if exists and not self.force:
            raise OutputError(f"{shown}: already exists", hint="Pass --force to replace it.")
        if exists and (self.target.is_symlink() or not self.target.is_dir()):
            raise OutputError(f"{shown}: exists and is not a directory; clair replaces only directories")
        parent = self.target.parent
        if not parent.is_dir():
            raise OutputError(f"{shown}: parent directory {printable(str(parent))} does not exist")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{shown}: cannot write in {printable(str(parent))} (permission denied)")

    def _clean_stale(self) -> None:
        """Remove temporary directories that killed runs (SIGKILL, power loss) left beside the target.

        Their names carry the writing process's id; only those of processes that no longer
        exist are removed, so a concurrent run's work is never touched.
        """
        for path in self.target.parent.glob(f".{glob.escape(self.target.name)}.*"):
            if not path.name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
                continue
            pid = path.name[len(self.target.name) + 2 :].split(".", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> Path:
        self._clean_stale()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=self._prefix(), suffix=TMP_SUFFIX, dir=self.target.parent))
            apply_umask(self.tmp, directory=True)
        except OSError as exc:
            raise OutputError(f"{printable(str(self.target))}: cannot write here ({os_error_text(exc)})") from exc
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.tmp is None:
            return
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self.check()
            old = None
            if self.target.exists():
                old = Path(tempfile.mkdtemp(prefix=self._prefix(), suffix=OLD_SUFFIX, dir=self.target.parent))
                os.replace(self.target, old / "previous")
            os.replace(self.tmp, self.target)
            COMMITTED.append(self.target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(f"{printable(str(self.target))}: cannot write ({os_error_text(exc)})") from exc
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def save_adapter(
    root: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], card: str, name: str | None = None
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors and README.md into ``root`` (or ``root/name``).

    ``name`` (an adapter name, from the input) is made a safe relative path and checked
    to stay inside ``root``. Non-finite tensors are refused before anything is written.

    Returns:
        The directory written.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise OutputError(
            f"the output for {printable(name or str(root))} would hold NaN or Inf values "
            f"({len(bad)} tensor(s), e.g. {printable(bad[0])}); nothing was written",
            hint="An input holds extreme values; inspect the adapters (clair inspect).",
        )
    directory = root if name is None else join_inside(root, safe_relpath(name))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(directory / SAFETENSORS_WEIGHTS_NAME), {"format": "pt"}
        )
        (directory / MODEL_CARD_NAME).write_text(card, encoding="utf-8")
        apply_umask(directory / SAFETENSORS_WEIGHTS_NAME)  # safetensors creates it 0600
    except OSError as exc:
        raise OutputError(f"{printable(str(directory))}: cannot write ({os_error_text(exc)})") from exc
    except SafetensorError as exc:
        raise OutputError(f"{printable(str(directory))}: cannot write the tensors ({exc})") from exc
    return directory


def _shapes(spec: ModuleSpec, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT's stored shapes of A and B at a new rank (conv kernels keep their layout)."""
    if spec.kind == "conv" and spec.weight_shape is not None:
        return (rank, *spec.weight_shape[1:]), (spec.d_out, rank, *([1] * (len(spec.weight_shape) - 2)))
    return (rank, spec.d_in), (spec.d_out, rank)


def _keys(spec: ModuleSpec) -> tuple[str, str]:
    if spec.kind == "embedding":
        return f"{PEFT_KEY_PREFIX}{spec.name}.lora_embedding_A", f"{PEFT_KEY_PREFIX}{spec.name}.lora_embedding_B"
    return f"{PEFT_KEY_PREFIX}{spec.name}.lora_A.weight", f"{PEFT_KEY_PREFIX}{spec.name}.lora_B.weight"


def merged_tensors(
    specs: Mapping[str, ModuleSpec], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """PEFT tensors of a merged adapter from per-module ``(A, B)`` (scale 1), laid out as ``specs``
    (an input's module table: kind and kernel shape)."""
    out = {}
    for name, (A, B) in sorted(factors.items()):
        spec = specs[name]
        a_shape, b_shape = _shapes(spec, A.shape[0])
        a_key, b_key = _keys(spec)
        out[a_key] = A.reshape(a_shape)
        out[b_key] = B.reshape(b_shape)
    return out


def refined_tensors(
    adapter: Adapter, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """All tensors of ``adapter``'s file (original names and dtypes), with the factors of each
    module in ``factors`` (``A`` ``r x d_in``, ``B`` ``d_out x r``, computed by the pipeline) in
    place of its own."""
    with adapter.reader() as reader:
        tensors = {key: reader.get(key) for key in reader.tensors}
    for name, (A, B) in factors.items():
        spec = adapter.modules[name]
        tensors[spec.a_key] = A.reshape(tensors[spec.a_key].shape).to(tensors[spec.a_key].dtype)
        tensors[spec.b_key] = B.reshape(tensors[spec.b_key].shape).to(tensors[spec.b_key].dtype)
    return tensors


def source_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter's own config as written to disk, or (a bare file and flags) one built by
    :func:`clair_cli.io.lora_config.lora_config` that gives every module its rank and alpha."""
    from clair_cli.io.lora_config import lora_config, plan_own

    if adapter.config.raw:
        return dict(adapter.config.raw)
    cfg = adapter.config
    modules = {m: (spec.rank, cfg.alpha_for(m)) for m, spec in adapter.modules.items()}
    return lora_config(plan_own(adapter), modules, cfg.use_rslora)
