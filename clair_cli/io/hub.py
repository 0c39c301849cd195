"""Hugging Face Hub sources: ``owner/name``, ``hf://owner/name[/subfolder][@revision]``.

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are downloaded,
through ``huggingface_hub`` so that HF_TOKEN, HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE and the shared cache behave as everywhere else in the ecosystem.
The resolved commit sha is read from the cache snapshot the files landed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clair_cli.constants import CONFIG_NAME, HUB_PREFIX, HUB_REPO_RE, PICKLE_HINT, SAFETENSORS_WEIGHTS_NAME
from clair_cli.errors import AdapterNotFound, HubError, UnsafeFormatError, UsageError
from clair_cli.types import AdapterRef


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None
    subfolder: str | None

    @property
    def name(self) -> str:
        name = self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return name + (f"@{self.revision}" if self.revision else "")


def check_subfolder(subfolder: str | None, source: str) -> str | None:
    """Refuse subfolders that could leave the repo: absolute, ``..``, backslashes."""
    if subfolder is None or subfolder.strip("/") == "":
        return None
    parts = PurePosixPath(subfolder).parts
    if subfolder.startswith("/") or "\\" in subfolder or ".." in parts or "." in subfolder.split("/"):
        raise UsageError(
            f"{source}: subfolder {subfolder!r} must be a relative path inside the repo (no '..', no leading '/')"
        )
    return subfolder.strip("/")


def parse_hub_spec(spec: str, subfolder: str | None = None) -> HubSpec:
    """Split a hub source into repo id, revision and subfolder.

    ``hf://owner/name/sub/dir@rev`` carries its own subfolder; ``subfolder`` (the
    ``--subfolder`` option) applies when the spec has none.
    """
    body = spec[len(HUB_PREFIX) :] if spec.startswith(HUB_PREFIX) else spec
    body, at, revision = body.partition("@")
    if at and not revision:
        raise UsageError(f"{spec}: empty revision after '@'")
    parts = body.strip("/").split("/")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    if not HUB_REPO_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UsageError(f"{spec}: not a valid Hugging Face repo id (expected owner/name)")
    if inner and subfolder:
        raise UsageError(f"{spec}: the source names a subfolder and --subfolder is given too; use one")
    return HubSpec(repo_id, revision or None, check_subfolder(inner or subfolder, spec))


def looks_like_hub_id(spec: str) -> bool:
    body = spec.partition("@")[0]
    return spec.startswith(HUB_PREFIX) or bool(HUB_REPO_RE.match(body))


def _commit_from_path(path: Path) -> str | None:
    parts = path.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def fetch(spec: str, subfolder: str | None = None) -> AdapterRef:
    """Download (or find in the cache) one hub adapter's two files.

    Raises:
        AdapterNotFound: repo, revision or file does not exist (or is private).
        HubError: the Hub cannot be reached and the files are not cached.
        UnsafeFormatError: the repo has only a pickle checkpoint.
    """
    hub = parse_hub_spec(spec, subfolder)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise HubError("huggingface_hub is not installed; `pip install huggingface-hub`") from exc

    where = f"{hub.repo_id}" + (f" (subfolder {hub.subfolder})" if hub.subfolder else "")
    at = f" at revision {hub.revision}" if hub.revision else ""
    paths: dict[str, Path] = {}
    for filename in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME):
        try:
            paths[filename] = Path(
                hf_hub_download(hub.repo_id, filename, subfolder=hub.subfolder, revision=hub.revision)
            )
        except GatedRepoError as exc:
            raise HubError(
                f"{spec}: hub repo {hub.repo_id} is gated",
                hint="Accept its conditions on the Hub, then set HF_TOKEN to a token of that account.",
            ) from exc
        except RepositoryNotFoundError as exc:
            raise AdapterNotFound(
                f"{spec}: hub repo {hub.repo_id} not found",
                hint="Check the spelling; for a private repo set HF_TOKEN.",
            ) from exc
        except RevisionNotFoundError as exc:
            raise AdapterNotFound(f"{spec}: revision {hub.revision!r} not found in {hub.repo_id}") from exc
        except LocalEntryNotFoundError as exc:
            raise HubError(
                f"{spec}: {filename} of {where}{at} is not in the local cache and the Hub cannot be reached",
                hint="Check the network, or unset HF_HUB_OFFLINE to allow downloads.",
            ) from exc
        except EntryNotFoundError as exc:
            if filename == SAFETENSORS_WEIGHTS_NAME:
                raise UnsafeFormatError(
                    f"{spec}: {where}{at} has no {SAFETENSORS_WEIGHTS_NAME} (pickle checkpoints are refused)",
                    hint=PICKLE_HINT,
                ) from exc
            raise AdapterNotFound(f"{spec}: {where}{at} has no {filename}; is it a PEFT adapter repo?") from exc
        except HfHubHTTPError as exc:
            raise HubError(f"{spec}: the Hub refused the request ({exc})") from exc
        except OSError as exc:
            raise HubError(f"{spec}: download failed ({exc})") from exc
    return AdapterRef(
        name=hub.name,
        source=spec,
        weights_file=paths[SAFETENSORS_WEIGHTS_NAME],
        config_file=paths[CONFIG_NAME],
        revision=_commit_from_path(paths[CONFIG_NAME]),
    )
