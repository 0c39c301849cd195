"""Option aliases shared by the commands, so every command spells them alike, and the option
groups (frozen dataclasses of them) that several commands take as one parameter each."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from clair_cli import methods
from clair_cli.cli.choices import DeviceChoice, Precision, Rescale, Side, SolverForm
from clair_cli.cli.command import OptionGroup
from clair_cli.cli.common import decimal_number
from clair_cli.constants import DEFAULT_MAX_ADAPTERS, DEFAULT_MAX_MODULES, DEFAULT_MAX_RANK, NORM_BOUND
from clair_cli.errors import UsageError
from clair_cli.params import DEFAULT_MERGE_TOL, AuditParams, MergeOptions

if TYPE_CHECKING:
    from clair_cli.io.sources import SourceOptions

# Every option that takes a value names it (FILE, N, X), so --help reads the same under Typer 0.20
# (Flower's pin) and the newer Typer that prints Python types (<float>); flags show none
# (cli/command.py).

SOURCE_HELP = (
    "SOURCE is an adapter directory, a directory of adapters or of .safetensors files, a .safetensors file, "
    "a hub id (owner/name\\[@rev], hf://...), @FILE (sources listed one a line) or - (listed on stdin)."
)


def command_help(command: Callable[..., Any], sources: str = SOURCE_HELP) -> str:
    """A command's help: its docstring, then what a SOURCE can be."""
    return inspect.cleandoc(command.__doc__ or "") + "\n\n" + sources


Sources = Annotated[
    list[str],
    # Described in each command's help (SOURCE_HELP): the arguments panel would show the
    # Python type under newer Typer.
    typer.Argument(metavar="SOURCE", show_default=False, hidden=True),
]
Candidates = Annotated[list[str], typer.Argument(metavar="CANDIDATE", show_default=False, hidden=True)]


def _stdout_alias(value: Optional[str]) -> Optional[str]:
    """``/dev/stdout`` is ``-``: written to stdout, never replaced by a file."""
    return "-" if value == "/dev/stdout" else value


JsonOut = Annotated[
    Optional[str],
    typer.Option(
        "--json", help="Write the JSON report to FILE ('-' for stdout).", metavar="FILE", callback=_stdout_alias
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages; only errors and requested data.")]


def _not_empty(option: str, value: Optional[str], hint: str) -> Optional[str]:
    """``value``, refused where given empty or blank (``"$VAR"`` unset read as the option left out, without a word)."""
    if value is not None and not value.strip():
        raise UsageError(f"{option} is empty", hint=hint)
    return value


def _subfolder(value: Optional[str]) -> Optional[str]:
    """An empty ``--subfolder`` is refused, as an empty ``--revision`` is (it read as none: the repo's root,
    and passed where a local source refuses any other)."""
    return _not_empty(
        "--subfolder", value, "Give a folder inside the hub repos, or leave --subfolder out for their root."
    )


Subfolder = Annotated[
    Optional[str],
    typer.Option("--subfolder", help="Subfolder inside hub repos.", metavar="PATH", callback=_subfolder),
]


def _revision(value: Optional[str]) -> Optional[str]:
    """An empty ``--revision`` is refused, as an empty ``@`` in a hub source is (it read as no revision: main)."""
    hint = "Give a branch, tag or commit, or leave --revision out for the default branch."
    return _not_empty("--revision", value, hint)


Revision = Annotated[
    Optional[str],
    typer.Option(
        "--revision",
        help="Branch, tag or commit of hub sources that name none (owner/name@rev names its own).",
        metavar="REV",
        callback=_revision,
    ),
]


def _token(value: Optional[str]) -> Optional[str]:
    """An empty ``--token`` (``--token "$HF_TOKEN"`` with the variable unset) is refused: it read as
    no token, and a private repo then answered as if it did not exist."""
    return _not_empty("--token", value, "Give the token, or leave --token out for HF_TOKEN or the saved login.")


Token = Annotated[
    Optional[str],
    typer.Option(
        "--token",
        help="Hugging Face token for private or gated hub sources (default: HF_TOKEN or the saved login). "
        "Never printed.",
        metavar="TOKEN",
        show_default=False,
        callback=_token,
    ),
]


def _config_path(text: str) -> Path:
    """``--config`` as a path; an empty value is refused (``Path("")`` is the current directory,
    which then read as "``.``: is a directory", not naming the option)."""
    _not_empty("--config", text, "Give the adapter_config.json to read, or leave --config out.")
    return Path(text)


ConfigFile = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        help="adapter_config.json for .safetensors sources without one.",
        metavar="FILE",
        parser=_config_path,
    ),
]


def _lora_alpha(value: Optional[float]) -> Optional[float]:
    """A finite, positive ``--lora-alpha``; anything else is a one-line usage error naming it."""
    if value is not None and not (0 < value < float("inf")):
        raise UsageError(f"--lora-alpha {value:g}: expected a finite number above 0")
    return value


LoraAlpha = Annotated[
    Optional[float],
    typer.Option(
        "--lora-alpha", help="lora_alpha for .safetensors sources without a config.", metavar="X", callback=_lora_alpha
    ),
]
Rslora = Annotated[bool, typer.Option("--rslora", help="With --lora-alpha: scale by alpha/sqrt(r).")]


def _base_model(value: Optional[str]) -> Optional[str]:
    """A ``--base-model`` no longer than a config's ``base_model_name_or_path`` may be (which every
    written config carries): refused here, not after the audit as a fault of the file being written."""
    from clair_cli.io.paths import printable
    from clair_cli.io.peft_config import MAX_BASE_MODEL_LENGTH

    hint = "Give the base model's hub id or path, or leave --base-model out to keep what the configs say."
    _not_empty("--base-model", value, hint)
    if value is not None and len(value) > MAX_BASE_MODEL_LENGTH:
        raise UsageError(
            f"--base-model {printable(value[:40])}...: {len(value)} characters long; clair accepts at most "
            f"{MAX_BASE_MODEL_LENGTH} (a hub id has at most 96, a path at most PATH_MAX)"
        )
    return value


BaseModel = Annotated[
    Optional[str],
    typer.Option(
        "--base-model",
        help="Base model of every source: names it where the config does not, replaces it (with a note) where it does.",
        metavar="NAME",
        callback=_base_model,
    ),
]
Intersect = Annotated[
    bool,
    typer.Option("--intersect", help="Analyse only the modules every adapter targets (listed in the report)."),
]
Rank = Annotated[
    str,
    typer.Option(
        "--rank",
        help="Detection rank of the shared subspace: 'auto' (parallel analysis) or a number. "
        "Sets the audit only, never the rank of merged or refined adapters.",
        metavar="N|auto",
    ),
]
MergeRank = Annotated[
    Optional[int],
    typer.Option(
        "--merge-rank",
        help="Rank of the written merged LoRA (default: the smallest within --merge-tol of the exact merge).",
        metavar="N",
        show_default=False,
    ),
]
MergeTol = Annotated[
    float,
    typer.Option(
        "--merge-tol",
        help="Relative Frobenius error allowed when the merged update is written at a lower rank.",
        metavar="X",
    ),
]
Project = Annotated[
    bool,
    typer.Option(
        "--project",
        help="CLAIR's projected merge: the collaborators' mean projected onto their shared subspace, "
        "at a rank chosen per module by cross-validation (default: the exact mean of the collaborators).",
    ),
]
ProjectRank = Annotated[
    Optional[int],
    typer.Option(
        "--project-rank",
        help="Fixed rank of the projection (implies --project); default: cross-validated per module.",
        metavar="N",
        show_default=False,
    ),
]
RefineRank = Annotated[
    str,
    typer.Option(
        "--project-rank",
        help="Rank of the subspace each adapter is projected on: 'auto' (cross-validated per module, at least "
        "the detected shared rank) or a number.",
        metavar="N|auto",
    ),
]
RescaleOpt = Annotated[
    Rescale,
    typer.Option("--rescale", help="none, or norm: scale the merged update to the merged adapters' median norm."),
]
Clip = Annotated[
    Optional[float],
    typer.Option(
        "--clip",
        help="Bounded influence: clip each merged update to FACTOR times the collaborators' median distance "
        "from their geometric median (centred clipping; 2 is ClairStrategy's default). Off by default: "
        "adapters trained with different alphas or recipes lie at different distances.",
        metavar="FACTOR",
        show_default=False,
    ),
]
NormBoundOpt = Annotated[
    Optional[str],
    typer.Option(
        "--norm-bound",
        help="Bounded influence: weight each merged update down to FACTOR times the collaborators' median norm, "
        "over all modules and on each module (widened where their norms spread), before --clip. Default 1.5, "
        "as in ClairStrategy's rounds; off: the plain mean of what the audit lets through.",
        metavar="FACTOR|off",
        show_default=False,
    ),
]
SideOpt = Annotated[Side, typer.Option("--side", help="Shared space: out (output/column), in (input/row) or both.")]
SolverOpt = Annotated[
    SolverForm,
    typer.Option("--solver", help="Decomposition form: noisy (default) or exact (noiseless Outlier Pursuit)."),
]
Threshold = Annotated[
    Optional[float],
    typer.Option(
        "--threshold", help="Flag above this off-subspace share (0-1) instead of the automatic rule.", metavar="X"
    ),
]
DeviceOpt = Annotated[
    DeviceChoice, typer.Option("--device", help="Where to compute: auto (a GPU when present), cpu or cuda.")
]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        help="Where the audit's per-module work runs: local (this process), ray (a Ray cluster: RAY_ADDRESS, "
        "one started on this machine, or a new local one) or ray://HOST:PORT (a remote one; the adapters' files "
        "must be readable at the same paths on its nodes). Needs clair-lora\\[ray]; results are identical.",
        metavar="local|ray|ray://HOST:PORT",
    ),
]
JobsOpt = Annotated[
    str,
    typer.Option(
        "--jobs",
        "-j",
        help="Worker processes of this machine that audit the modules (local executor): a number (at most the "
        "usable CPUs over CLAIR_NUM_THREADS), or auto (that many, as memory allows). 1 runs in this process. "
        "Results are identical.",
        metavar="N|auto",
    ),
]
DtypeOpt = Annotated[Precision, typer.Option("--dtype", help="Working precision: float32 or float64.")]
# No min/max here: AuditParams checks the range once, in one line naming --seed (Typer's
# range check would print a usage dump instead).
Seed = Annotated[
    int,
    typer.Option(
        "--seed",
        help="Seed of the random rotations, 0 to 2**32-1 (results are deterministic given it).",
        metavar="N",
    ),
]
MarkdownOut = Annotated[
    Optional[str],
    typer.Option(
        "--markdown", help="Write a Markdown report to FILE ('-' for stdout).", metavar="FILE", callback=_stdout_alias
    ),
]
SarifOut = Annotated[
    Optional[str],
    typer.Option(
        "--sarif",
        help="Write a SARIF 2.1.0 log to FILE ('-' for stdout) for code scanning (GitHub): one result per "
        "flagged adapter.",
        metavar="FILE",
        callback=_stdout_alias,
    ),
]
PlotOut = Annotated[
    Optional[str],
    typer.Option(
        "--plot", help="Write a PNG (needs clair-lora\\[plot]) with the score heatmap and spectra.", metavar="FILE.png"
    ),
]
ExitZero = Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even when adapters are flagged.")]
AllowUnanalysed = Annotated[
    bool,
    typer.Option(
        "--allow-unanalysed",
        help="Judge a candidate's LoRA update alone even where its file holds what PEFT applies and clair does "
        "not analyse (DoRA magnitudes, biases, full weights, base-rewriting or random inits); by default such "
        "a candidate is flagged.",
    ),
]
Force = Annotated[
    bool, typer.Option("--force", "-f", help="Replace an existing output directory (empty, or an adapter clair wrote).")
]
Out = Annotated[
    Path, typer.Option("--out", "-o", help="Output directory (must not exist unless --force).", metavar="DIR")
]
MergeMethodOpt = Annotated[
    methods.MergeMethodName, typer.Option("--method", "-m", help=methods.help_text(), metavar="NAME")
]
Weights = Annotated[
    Optional[str],
    typer.Option(
        "--weights", help="Comma-separated merge weights, one per adapter in report order.", metavar="W1,W2,..."
    ),
]
Reference = Annotated[
    Optional[list[str]],
    typer.Option(
        "--reference",
        "-r",
        help="A trusted adapter source: repeat the option for each (--reference a --reference b), or give "
        "a directory of them or @FILE. Exactly one value follows each --reference.",
        metavar="SOURCE",
        show_default=False,
    ),
]
DropExtras = Annotated[
    bool,
    typer.Option(
        "--drop-extras",
        help="Merge the LoRA updates alone when adapters also hold DoRA magnitudes, LoRA biases, "
        "modules_to_save weights (e.g. a classifier head) or trainable tokens; without it such a merge is "
        "refused. What is dropped is listed in the model card and the JSON report.",
    ),
]
MaxRank = Annotated[
    int,
    typer.Option(
        "--max-rank",
        min=1,
        help="Refuse adapters with a module of higher rank, before reading any factor: memory grows with the "
        "square of the pool's summed rank (docs: Limits).",
        metavar="N",
    ),
]
MaxModules = Annotated[
    int,
    typer.Option(
        "--max-modules",
        min=1,
        help="Refuse adapters with more LoRA modules than this, before reading any factor: the audit "
        "costs tens of milliseconds per module (docs: Limits).",
        metavar="N",
    ),
]
MaxAdapters = Annotated[
    int,
    typer.Option(
        "--max-adapters",
        min=1,
        help="Refuse more adapters than this in one run (each source list counted apart), before opening "
        "any: the verdict's calibration grows with the square of the pool (docs: Limits).",
        metavar="N",
    ),
]


# --- option groups: the options several commands share, each group one parameter ---------------
# (cli/command.py: expand_groups shows Typer the fields, in this order, with these defaults).


@dataclass(frozen=True)
class Reports(OptionGroup):
    """Where the audit's reports go."""

    json_out: JsonOut = None
    markdown: MarkdownOut = None
    plot: PlotOut = None


@dataclass(frozen=True)
class ScanReports(Reports):
    """The reports of a command that judges adapters (audit, gate): SARIF for code scanning too."""

    sarif: SarifOut = None


@dataclass(frozen=True)
class Audit(OptionGroup):
    """The audit's options; :meth:`params` checks them once."""

    rank: Rank = "auto"
    side: SideOpt = Side.OUT
    solver: SolverOpt = SolverForm.NOISY
    threshold: Threshold = None
    intersect: Intersect = False
    device: DeviceOpt = DeviceChoice.AUTO
    dtype: DtypeOpt = Precision.FLOAT32
    seed: Seed = 0
    executor: ExecutorOpt = "local"
    jobs: JobsOpt = "1"

    def params(self) -> AuditParams:
        """The audit's parameters; a bad value is a usage error (exit 2)."""
        return AuditParams(
            solver=self.solver,
            side=self.side,
            rank=self.rank,
            threshold=self.threshold,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
            executor=self.executor,
            jobs=self.jobs,
        )


@dataclass(frozen=True)
class Run(OptionGroup):
    """What the run prints and how it exits."""

    exit_zero: ExitZero = False
    quiet: Quiet = False


@dataclass(frozen=True)
class Read(OptionGroup):
    """How to read the sources (``clair inspect``, one adapter at a time)."""

    subfolder: Subfolder = None
    revision: Revision = None
    token: Token = None
    config: ConfigFile = None
    lora_alpha: LoraAlpha = None
    rslora: Rslora = False
    base_model: BaseModel = None
    max_rank: MaxRank = DEFAULT_MAX_RANK
    max_modules: MaxModules = DEFAULT_MAX_MODULES

    def source_options(self, max_adapters: int = DEFAULT_MAX_ADAPTERS) -> SourceOptions:
        """How :mod:`clair_cli.io.sources` reads them."""
        from clair_cli.io.sources import SourceOptions

        return SourceOptions(
            subfolder=self.subfolder,
            config=self.config,
            lora_alpha=self.lora_alpha,
            use_rslora=self.rslora,
            base_model=self.base_model,
            max_rank=self.max_rank,
            max_adapters=max_adapters,
            max_modules=self.max_modules,
            revision=self.revision,
            token=self.token,
        )


@dataclass(frozen=True)
class ReadPool(Read):
    """How to read the sources of a pool: :class:`Read`, and how many adapters at most."""

    max_adapters: MaxAdapters = DEFAULT_MAX_ADAPTERS

    def source_options(self, max_adapters: int | None = None) -> SourceOptions:
        return super().source_options(self.max_adapters if max_adapters is None else max_adapters)


@dataclass(frozen=True)
class Target(OptionGroup):
    """The output directory of merge and refine."""

    out: Out
    force: Force = False


@dataclass(frozen=True)
class Merging(OptionGroup):
    """How ``clair merge`` merges; :meth:`options` checks them once."""

    method: MergeMethodOpt = methods.MergeMethodName("clair")
    weights: Weights = None
    merge_rank: MergeRank = None
    merge_tol: MergeTol = DEFAULT_MERGE_TOL
    project: Project = False
    project_rank: ProjectRank = None
    rescale: RescaleOpt = Rescale.NONE
    clip: Clip = None
    norm_bound: NormBoundOpt = None

    def options(self) -> MergeOptions:
        """The merge's options (``--project-rank`` implies ``--project``; no ``--norm-bound``: 1.5)."""
        project = self.project or self.project_rank is not None
        bound = norm_bound_value(self.norm_bound)
        return MergeOptions(self.merge_rank, self.merge_tol, project, self.project_rank, self.rescale, self.clip, bound)


def norm_bound_value(text: str | None) -> float | None:
    """``--norm-bound``'s factor: the default (``NORM_BOUND``) where not given, None for ``off``."""
    if text is None:
        return NORM_BOUND
    if text.strip().lower() == "off":
        return None
    value = decimal_number(text)
    if not (math.isfinite(value) and value >= 1):
        message = f"--norm-bound {text}: expected a number of at least 1 (times the median norm), or off"
        raise UsageError(message)
    return value
