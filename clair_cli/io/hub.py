"""Hugging Face Hub sources: ``owner/name``, ``hf://owner/name[/subfolder][@revision]``, and one
LoRA file of a repo, ``hf://owner/name[/subfolder]/file.safetensors[@revision]``; huggingface_hub's own URIs,
``hf://[models/]owner/name[@revision][/path]``, read as it reads them (a dataset, Space, kernel or bucket refused).

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are downloaded (a repo
without ``adapter_config.json``: its diffusers LoRA file ``pytorch_lora_weights.safetensors``;
a named file: that file alone, read as a bare weights file is; a repo read from its diffusers LoRA
file, or from a diffusion transformer's PEFT adapter, is also listed, to tell that diffusers' ``load_lora_weights``
loads no other file from it),
through ``huggingface_hub`` so that HF_TOKEN, HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE and the shared cache behave as everywhere else in the ecosystem.
The resolved commit sha is read from the cache snapshot the files landed in.

The Hub is not trusted more than the files it serves: a revision must be a git
ref name or a commit sha (no ``..``), every answer's ``X-Repo-Commit`` must be 40
hex digits and its ``ETag`` a plain token before huggingface_hub builds a cache
path from them (a response hook on its HTTP client), and each hub source has one
deadline for its downloads together (``CLAIR_HUB_TIMEOUT``, seconds; a Hub that trickles
bytes is cut off, and the download thread stops at its next piece).
Retry warnings of huggingface_hub are silenced: clair prints one error.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from clair_cli.constants import (
    CONFIG_NAME,
    DIFFUSERS_GUESS_SKIPPED,
    DIFFUSERS_WEIGHTS_NAME,
    HUB_DEFAULT_TIMEOUT_S,
    HUB_MAX_FILE_BYTES,
    HUB_MAX_TIMEOUT_S,
    HUB_PREFIX,
    HUB_REPO_RE,
    MAX_CONFIG_BYTES,
    MLX_WEIGHTS_NAME,
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    SAFETENSORS_WEIGHTS_NAME,
    WAIT_SLICE_S,
)
from clair_cli.errors import AdapterFormatError, AdapterNotFound, HubError, UnsafeFormatError, UsageError
from clair_cli.io.paths import CONTROL_RE, printable, resolved, shown_path
from clair_cli.types import AdapterRef

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
ETAG_RE = re.compile(r'^(?:W/)?"?([A-Za-z0-9_\-]{1,128})"?$')
REVISION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,254}$")


class HubAnswerError(Exception):
    """A Hub response whose headers clair will not let become cache paths."""


# Files a repo may lack: without adapter_config.json it may be a diffusers LoRA repo.
_OPTIONAL = (CONFIG_NAME, DIFFUSERS_WEIGHTS_NAME, MLX_WEIGHTS_NAME)


class _Missing(AdapterNotFound):
    """The repo has no such file (one of :data:`_OPTIONAL`); ``commit``: the commit at which the Hub said so."""

    commit: str | None = None


class _NotCached(HubError):
    """Offline, and the file (one of :data:`_OPTIONAL`) is not in the cache."""


# The repo types of huggingface_hub's hf:// URIs (``hf://datasets/owner/name``); a model repo needs no prefix.
_URI_TYPES = {
    "models": "model",
    "datasets": "dataset repo",
    "spaces": "Space",
    "kernels": "kernel repo",
    "buckets": "bucket",
}
# Revisions with a '/' that huggingface_hub's hf:// URIs read whole before a path: refs/pr/N, refs/convert/NAME.
_SPECIAL_REF_RE = re.compile(r"^refs/(?:convert/[\w.-]+|pr/\d+)(?=/|$)")


def check_revision(revision: str, source: str) -> str:
    """Accept a branch or tag name (git ref rules, e.g. ``main``, ``v1.0``, ``refs/pr/3``) or a commit sha."""
    parts = revision.split("/")
    if (
        not REVISION_RE.match(revision)
        or ".." in revision
        or any(p == "" or p.startswith(".") or p.endswith((".", ".lock")) for p in parts)
    ):
        raise UsageError(
            f"{printable(source)}: revision {printable(revision)!r} is not a branch, tag or commit sha",
            hint="Use e.g. @main, @v1.0 or a 40-hex commit sha.",
        )
    return revision


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None
    subfolder: str | None
    filename: str | None = None  # one .safetensors file of the repo (in ``subfolder``)

    @property
    def name(self) -> str:
        name = self.repo_id + "".join(f"/{p}" for p in (self.subfolder, self.filename) if p)
        return name + (f"@{self.revision}" if self.revision else "")


def check_subfolder(subfolder: str | None, source: str) -> str | None:
    """Refuse subfolders that could leave the repo: absolute, ``..``, backslashes."""
    if subfolder is None or subfolder.strip("/") == "":
        return None
    parts = PurePosixPath(subfolder).parts
    if (
        subfolder.startswith("/")
        or "\\" in subfolder
        or ".." in parts
        or "." in subfolder.split("/")
        or CONTROL_RE.search(subfolder)
    ):
        raise UsageError(
            f"{printable(source)}: subfolder {printable(subfolder)!r} must be a relative path inside the repo "
            "(no '..', no leading '/')"
        )
    return subfolder.strip("/")


def parse_hub_spec(spec: str, subfolder: str | None = None, revision: str | None = None) -> HubSpec:
    """Split a hub source into repo id, revision and subfolder.

    ``hf://owner/name/sub/dir@rev`` carries its own subfolder and revision; ``subfolder`` and
    ``revision`` (the ``--subfolder`` and ``--revision`` options) apply when the spec names none:
    a revision written in the source wins over ``--revision``.
    """
    default_revision = revision
    uri = spec.startswith(HUB_PREFIX)
    body = spec[len(HUB_PREFIX) :] if uri else spec
    kind = body.partition("/")[0]
    if uri and kind in _URI_TYPES:  # huggingface_hub's hf://[TYPE/]owner/name URIs
        if _URI_TYPES[kind] != "model":
            raise UsageError(
                f"{printable(spec)}: names a {_URI_TYPES[kind]} ({kind}/ in a huggingface_hub hf:// URI); clair reads "
                "adapters from model repos",
                hint="Write the model repo as hf://owner/name (or hf://models/owner/name).",
            )
        body = body.partition("/")[2]
    body, at, revision = body.partition("@")
    if uri and at and "/" in revision and len(body.strip("/").split("/")) == 2:
        # huggingface_hub's order, hf://owner/name@REV/PATH: the revision ends at the first '/' (a pull request's
        # refs/pr/N and refs/convert/NAME whole; a '/' of a branch name is written %2F, as huggingface_hub writes it).
        special = _SPECIAL_REF_RE.match(revision)
        end = special.end() if special else revision.index("/")
        revision, path = revision[:end], revision[end:].strip("/")
        if "@" in path:
            raise UsageError(f"{printable(spec)}: more than one '@' (a revision is written once)")
        body = body.strip("/") + (f"/{path}" if path else "")
    if uri and "%" in revision:
        revision = unquote(revision)
    if at and not revision:
        raise UsageError(f"{printable(spec)}: empty revision after '@'")
    if revision:
        check_revision(revision, spec)
    parts = body.strip("/").split("/")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    if not HUB_REPO_RE.match(repo_id) or ".." in repo_id or "--" in repo_id or len(repo_id) > 200:
        raise UsageError(f"{printable(spec)}: not a valid Hugging Face repo id (expected owner/name)")
    if inner and subfolder:
        raise UsageError(f"{printable(spec)}: the source names a subfolder and --subfolder is given too; use one")
    if not revision and default_revision:
        revision = check_revision(default_revision, spec)
    folder, _, last = (inner or "").rpartition("/")
    if last.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeFormatError(f"{printable(spec)}: {printable(last)!r} is a pickle file (refused)", hint=PICKLE_HINT)
    if last.endswith(".safetensors"):  # one file of the repo, in the folder the source names
        return HubSpec(repo_id, revision or None, check_subfolder(folder, spec), check_filename(last, spec))
    return HubSpec(repo_id, revision or None, check_subfolder(inner or subfolder, spec))


def check_filename(name: str, source: str) -> str:
    """A file name of a hub source: one path component, no control characters."""
    if name in (".safetensors",) or "\\" in name or CONTROL_RE.search(name):
        raise UsageError(f"{printable(source)}: {printable(name)!r} is not a file name inside the repo")
    return name


def looks_like_hub_id(spec: str) -> bool:
    body = spec.partition("@")[0]
    return spec.startswith(HUB_PREFIX) or bool(HUB_REPO_RE.match(body))


def _commit_from_path(path: Path) -> str | None:
    """The commit of a file huggingface_hub downloaded, from its cache path
    ``.../models--<owner>--<name>/snapshots/<commit>/<path in the repo>``: the first such triple (the repo's own
    folders, named by whoever uploaded it, come after it and may spell one too)."""
    parts = path.parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and COMMIT_RE.match(parts[i + 1]):
            return parts[i + 1]
    return None


def _check_answer(response: Any) -> None:
    """httpx response hook: refuse headers that huggingface_hub would turn into cache paths, and
    a file larger than the download's bound (``_local.max_bytes``), announced or sent."""
    _check_deadline()
    response.stream = _guarded(response.stream)
    headers = response.headers
    box = getattr(_local, "box", None)
    if box is not None and isinstance(response.status_code, int) and response.status_code < 400:
        box["answered"] = True  # the Hub answered this download (not a cached copy standing in for it)
    elif box is not None and isinstance(response.status_code, int):  # what it answered, if a cached copy stands in
        reason = printable(str(getattr(response, "reason_phrase", "") or "")[:60])
        box.setdefault("refused", f"{response.status_code} {reason}".strip())
    if response.status_code == 429:  # huggingface_hub waits Retry-After before it asks again
        box = getattr(_local, "box", None)
        if box is not None:
            box["rate_limited"] = headers.get("Retry-After", "")
    bound = getattr(_local, "max_bytes", None)
    for name in ("X-Linked-Size", "Content-Length"):
        size = headers.get(name)
        if bound is not None and size is not None and size.strip().isdigit() and int(size) > bound:
            raise HubAnswerError(f"the Hub announces a file of {int(size)} bytes; clair accepts at most {bound}")
    commit = headers.get("X-Repo-Commit")
    if commit is not None and not COMMIT_RE.match(commit):
        raise HubAnswerError(f"the Hub answered with an invalid commit id {printable(commit[:80])!r}")
    for name in ("X-Linked-Etag", "ETag"):
        etag = headers.get(name)
        if etag is not None and not ETAG_RE.match(etag):
            raise HubAnswerError(f"the Hub answered with an invalid {name} {printable(etag[:80])!r}")
        box = getattr(_local, "box", None)
        if etag is not None and box is not None:  # the names of this download's partial files
            box.setdefault("etags", set()).add(etag.strip().removeprefix("W/").strip('"'))


# The oldest huggingface_hub whose HTTP client (httpx2, set_client_factory) clair hooks to bound, time and
# check every download; pyproject.toml declares it. An environment may hold an older one anyway (transformers
# 4 pins huggingface-hub below 1.0, and pip keeps what is installed where it can).
HUB_MIN_VERSION = "2.0"
HUB_HINT = (
    f"pip install -U 'huggingface-hub>={HUB_MIN_VERSION}' (transformers 4 pins huggingface-hub below 1.0: "
    "use transformers 5, or clair in an environment of its own)."
)


def _require_hub() -> None:
    """Refuse a Hub source where huggingface_hub is missing or older than :data:`HUB_MIN_VERSION`.

    Raises:
        HubError: saying which version is installed.
    """
    from packaging.version import InvalidVersion, Version

    try:
        from huggingface_hub import __version__ as installed
    except ImportError as exc:
        raise HubError(f"huggingface_hub is not installed ({exc})", hint=HUB_HINT) from exc
    try:
        old = Version(installed) < Version(HUB_MIN_VERSION)
    except InvalidVersion:
        old = False  # a build of its own: tried as it is
    if old:
        raise HubError(
            f"huggingface_hub {printable(installed)} is installed; a Hub source needs {HUB_MIN_VERSION} or later "
            "(clair bounds, times and checks each download through its HTTP client)",
            hint=HUB_HINT,
        )


_installed = False


def _guard_client() -> None:
    """Make huggingface_hub's shared HTTP client check every answer; silence its retry warnings."""
    global _installed
    if _installed:
        return
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http, logging

    logging.set_verbosity_error()
    # Its warnings (not enough free disk space, ...) would be raw lines beside clair's one Error: line.
    warnings.filterwarnings("ignore", module=r"huggingface_hub(\.|$)")
    # Xet transfers (hf_xet, in Rust) pass no HTTP hook: no deadline, size bound or stop would
    # reach them. Over HTTP the Hub serves the same files (huggingface_hub's own fallback).
    constants.HF_HUB_DISABLE_XET = True

    def factory() -> Any:
        client = _http.default_client_factory()
        client.event_hooks["request"] = [*client.event_hooks.get("request", []), _guard_request]
        client.event_hooks["response"] = [*client.event_hooks.get("response", []), _check_answer]
        return client

    set_client_factory(factory)
    _installed = True


def _timeout() -> float:
    """CLAIR_HUB_TIMEOUT: seconds a hub source's downloads may take in all (default 300)."""
    raw = os.environ.get("CLAIR_HUB_TIMEOUT", "").strip()
    if not raw:
        return HUB_DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value <= HUB_MAX_TIMEOUT_S):  # also refuses nan and inf
        raise UsageError(
            f"CLAIR_HUB_TIMEOUT={printable(raw[:40])!r}: expected a number of seconds above 0 and at most "
            f"{HUB_MAX_TIMEOUT_S:g}",
            hint=f"It bounds each hub source's download in all; unset it for the default {HUB_DEFAULT_TIMEOUT_S:g} s.",
        )
    return value


class HubDeadline(Exception):
    """The download ran past its deadline (raised inside huggingface_hub's HTTP calls to stop them)."""


# The deadline of the download running in this thread (set by _with_deadline's worker).
_local = threading.local()


def _check_deadline() -> None:
    if getattr(_local, "box", {}).get("stop"):
        raise HubDeadline("stopped")
    deadline = getattr(_local, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise HubDeadline("deadline passed")


# How long a stopped download gets to notice it (at its next request or received piece) and
# leave through huggingface_hub's own clean-up, which deletes its partial file.
_STOP_GRACE_S = 2.0


def _stop(done: threading.Event, box: dict[str, Any]) -> None:
    """Stop a download that clair gives up on (its deadline, Ctrl-C, SIGTERM) without leaving its
    partial file in the hub cache: huggingface_hub names it per process
    (``<etag>.<random>.incomplete``), so nothing would ever resume or remove it."""
    box["stop"] = True
    try:
        done.wait(_STOP_GRACE_S)
    finally:
        if not done.is_set():  # blocked in a read: its file goes with this process
            _remove_open_partials(box.get("etags", set()))


def _remove_open_partials(etags: set[str]) -> None:
    """Delete the ``.incomplete`` files of the hub cache that this process holds open for the
    files of ``etags`` (``<etag>.<random>.incomplete``; Linux's ``/proc/self/fd``, elsewhere only
    the grace of :func:`_stop` applies): another process's download, or another thread's of this
    one, is left alone."""
    from huggingface_hub import constants

    fds = Path("/proc/self/fd")
    try:
        names = os.listdir(fds)
        cache = os.path.realpath(constants.HF_HUB_CACHE) + os.sep
    except OSError:
        return
    for fd in names:
        try:
            target = os.readlink(fds / fd)
        except OSError:  # closed meanwhile, or not a link
            continue
        name = os.path.basename(target)
        mine = name.endswith(".incomplete") and name.split(".", 1)[0] in etags
        if mine and target.startswith(cache):
            with contextlib.suppress(OSError):
                os.unlink(target)


def _guarded(stream: Any) -> Any:
    """A response body that stops at the deadline (a Hub that trickles a byte every few seconds
    never trips a read timeout, so the worker thread checks the clock at every piece it gets) and
    at the download's size bound."""
    import httpx2

    class GuardedStream(httpx2.SyncByteStream):
        def __iter__(self) -> Any:
            bound, sent = getattr(_local, "max_bytes", None), 0
            for chunk in stream:
                _check_deadline()
                sent += len(chunk)
                if bound is not None and sent > bound:
                    raise HubAnswerError(f"the Hub sends more than {bound} bytes for one file")
                yield chunk

        def close(self) -> None:
            stream.close()

    return GuardedStream()


def _guard_request(request: Any) -> None:
    """httpx request hook: no new request (a retry, a redirect) after the deadline; no read
    waits longer than what is left of it."""
    _check_deadline()
    deadline = getattr(_local, "deadline", None)
    timeout = request.extensions.get("timeout")
    if deadline is not None and isinstance(timeout, dict):
        left = max(deadline - time.monotonic(), 0.01)
        request.extensions["timeout"] = {k: left if v is None else min(v, left) for k, v in timeout.items()}


def _wait_in_slices(done: threading.Event, deadline: float) -> None:
    """Wait until ``done`` is set or the ``deadline`` (``time.monotonic()``) passes, in slices of
    :data:`~clair_cli.constants.WAIT_SLICE_S`, so that a pending signal handler runs within one."""
    while not done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        done.wait(min(left, WAIT_SLICE_S))


def _with_deadline(
    deadline: float,
    fn: Any,
    what: str,
    *args: Any,
    max_bytes: int | None = None,
    box: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Run a download with an overall deadline (``time.monotonic()`` value): read timeouts alone
    let a trickling Hub hang forever. ``box`` (a dict): where the download's state is kept, ``answered``
    among it when the Hub answered one of its requests without an error status.

    The caller returns at the deadline in any case, and on Ctrl-C or SIGTERM: the worker thread
    (a daemon) is told to stop at its next request or received piece (:func:`_guarded`) and
    given a moment to remove its partial file (:func:`_stop`).
    """
    box = {} if box is None else box
    # Waited on instead of Thread.join, which a Ctrl-C during the wait leaves believing (Python
    # 3.11) that the thread has ended.
    done = threading.Event()

    def work() -> None:
        _local.deadline = deadline
        _local.max_bytes = max_bytes
        _local.box = box
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the calling thread
            box["error"] = exc
        finally:
            done.set()

    limit = _timeout()
    left = deadline - time.monotonic()
    worker = threading.Thread(target=work, daemon=True, name="clair-hub-download")
    if left > 0:
        worker.start()
        try:
            _wait_in_slices(done, deadline)
        except BaseException:  # Ctrl-C, SIGTERM (raised as Terminated)
            _stop(done, box)
            raise
    late = "error" in box and time.monotonic() >= deadline  # HubDeadline, or what huggingface_hub made of it
    running = left > 0 and not done.is_set()
    if left <= 0 or running or late:
        if running:
            _stop(done, box)
        if "rate_limited" in box:
            after = printable(str(box["rate_limited"])[:40])
            raise HubError(
                f"{what}: download did not finish within {limit:g} s: the Hub rate-limits these requests "
                f"(429 Too Many Requests{f', Retry-After {after}' if after else ''})",
                hint="Retry later, give a token (HF_TOKEN or --token: logged-in requests have higher limits), "
                "or raise CLAIR_HUB_TIMEOUT.",
            )
        raise HubError(
            f"{what}: download did not finish within {limit:g} s",
            hint="The Hub is slow or stalled; retry later or raise CLAIR_HUB_TIMEOUT.",
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _status(exc: BaseException | None) -> tuple[int, str, str] | None:
    """``(status, reason, Retry-After)`` of the Hub answer behind ``exc`` (an ``HfHubHTTPError``, or the
    ``LocalEntryNotFoundError`` huggingface_hub raises from one where no cached copy stands in), else None."""
    from huggingface_hub.errors import HfHubHTTPError

    for err in (exc, getattr(exc, "__cause__", None)):
        response = getattr(err, "response", None) if isinstance(err, HfHubHTTPError) else None
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            reason = printable(str(getattr(response, "reason_phrase", "") or "")[:60])
            headers = getattr(response, "headers", None) or {}
            return status, reason, printable(str(headers.get("Retry-After", ""))[:40])
    return None


def _server_said(exc: BaseException | None) -> str | None:
    """The first line of the Hub's own message (``server_message``: its ``X-Error-Message`` header or error body)
    behind ``exc``, an ``HfHubHTTPError`` or the ``LocalEntryNotFoundError`` raised from one, else None."""
    from huggingface_hub.errors import HfHubHTTPError

    for err in (exc, getattr(exc, "__cause__", None)):
        if isinstance(err, HfHubHTTPError):
            said = str(getattr(err, "server_message", None) or "").strip().splitlines()
            return printable(said[0][:200]) if said else None
    return None


def _refusal(spec: str, what: str, answer: tuple[int, str, str], detail: str | None = None) -> HubError:
    """The one-line error of a Hub that answered ``what`` (a file of a repo) with an HTTP error status:
    the Hub was reached, so the message says what it answered, not that it cannot be reached."""
    status, reason, retry_after = answer
    code = f"{status} {reason}".strip() + (f", Retry-After {retry_after}" if status == 429 and retry_after else "")
    extra = f": {detail}" if detail else ""
    if status == 401:
        hint = (
            "The Hub did not accept the credentials: check the token (HF_TOKEN, --token or the saved login); it may "
            "be expired or revoked."
        )
    elif status == 403:
        hint = (
            "The token may lack read access to this repo (a fine-grained token must grant it), or the repo is "
            "disabled; check it on the Hub."
        )
    elif status == 402:  # huggingface_hub's EgressLimitError (2.5), a plain HfHubHTTPError before
        hint = (
            "The Hub answers 402 to an account that has reached its download (egress) allowance: its message says "
            "the usage and how to get a higher allowance."
        )
    elif status == 429:
        hint = "Retry later, or give a token (HF_TOKEN or --token: logged-in requests have higher limits)."
    elif status >= 500:
        hint = "The Hub is down or overloaded (a server error); retry later."
    else:
        hint = "Check the source, HF_ENDPOINT and the token."
    said = (
        "could not serve"
        if status >= 500
        else "rate-limits the requests for"
        if status == 429
        else "refused the request for"
    )
    return HubError(f"{spec}: the Hub {said} {what} ({code}){extra}", hint=hint)


def _check_cache() -> None:
    """The hub cache (HF_HOME / HF_HUB_CACHE) must resolve: a symlink loop there is a one-line error."""
    from huggingface_hub import constants

    for var, value in (("HF_HUB_CACHE", constants.HF_HUB_CACHE), ("HF_HOME", constants.HF_HOME)):
        resolved(Path(value), f"{var}={shown_path(value)} (the Hugging Face cache)", HubError)


def fetch(spec: str, subfolder: str | None = None, revision: str | None = None, token: str | None = None) -> AdapterRef:
    """Download (or find in the cache) one hub adapter's two files.

    Args:
        spec: ``owner/name[@rev]`` or ``hf://owner/name[/subfolder][@rev]``.
        subfolder, revision: used when ``spec`` names none (``--subfolder``, ``--revision``).
        token: a Hugging Face token (``--token``); None lets huggingface_hub use HF_TOKEN or the
            saved login. It goes to huggingface_hub alone, never into a message or report.

    Raises:
        AdapterNotFound: repo, revision or file does not exist (or is private).
        HubError: the Hub cannot be reached and the files are not cached.
        UnsafeFormatError: the repo has an adapter_config.json and no adapter_model.safetensors (none, or
            only a pickle checkpoint).
    """
    hub = parse_hub_spec(spec, subfolder, revision)
    _require_hub()
    try:
        import httpx2
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
        raise HubError(f"huggingface_hub {HUB_MIN_VERSION} or later is not installed ({exc})", hint=HUB_HINT) from exc

    _guard_client()
    _check_cache()
    deadline = time.monotonic() + _timeout()  # one deadline for the source's files together
    spec = printable(spec)
    where = f"{hub.repo_id}" + (f" (subfolder {hub.subfolder})" if hub.subfolder else "")
    at = f" at revision {hub.revision}" if hub.revision else ""
    offline = offline_variable()

    # The files read from the cache where the Hub did not answer for the revision, or answered an error status
    # (which, if it did, with the file): huggingface_hub then reads the commit the cache last saw for the branch.
    stale: list[tuple[str, str | None]] = []

    def get(filename: str, revision: str | None = hub.revision) -> Path:  # noqa: C901 - one branch per answer
        box: dict[str, Any] = {}
        try:
            path = Path(
                _with_deadline(
                    deadline,
                    hf_hub_download,
                    f"{spec}: {filename}",
                    hub.repo_id,
                    filename,
                    subfolder=hub.subfolder,
                    revision=revision,
                    token=token,
                    max_bytes=MAX_CONFIG_BYTES if filename == CONFIG_NAME else HUB_MAX_FILE_BYTES,
                    box=box,
                )
            )
            if not offline and not COMMIT_RE.match(revision or "") and not box.get("answered"):
                # huggingface_hub read the branch's cached commit (refs/) because the Hub did not answer:
                # the branch may have moved on since.
                stale.append((filename, box.get("refused")))
            return path
        except GatedRepoError as exc:
            raise HubError(
                f"{spec}: hub repo {hub.repo_id} is gated",
                hint="Accept its conditions on the Hub, then give a token of that account (HF_TOKEN or --token).",
            ) from exc
        except RepositoryNotFoundError as exc:
            raise AdapterNotFound(
                f"{spec}: hub repo {hub.repo_id} not found",
                hint="Check the spelling; for a private repo give a token (HF_TOKEN or --token).",
            ) from exc
        except RevisionNotFoundError as exc:
            after = spec.partition("@")[2]
            split = spec.startswith(HUB_PREFIX) and "/" in after and unquote(after) != hub.revision
            raise AdapterNotFound(
                f"{spec}: revision {hub.revision!r} not found in {hub.repo_id}",
                hint="In an hf:// source the revision ends at the first '/' after '@', as in huggingface_hub's "
                "hf://owner/name@REV/PATH: write a '/' of a branch name as %2F (@feature%2Fx), or give the branch "
                "with --revision."
                if split
                else None,
            ) from exc
        except LocalEntryNotFoundError as exc:
            answer = None if offline else _status(exc)
            if answer is not None:  # the Hub answered with an error status, and no cached copy stands in
                raise _refusal(spec, f"{filename} of {where}{at}", answer, _server_said(exc)) from exc
            if offline:
                raise (_NotCached if filename in _OPTIONAL else HubError)(
                    f"{spec}: {filename} of {where}{at} is not in the local cache and {offline} is set",
                    hint=f"Unset {offline} to allow downloads.",
                ) from exc
            raise HubError(
                f"{spec}: {filename} of {where}{at} is not in the local cache and the Hub cannot be reached",
                hint="Check the network and HF_ENDPOINT.",
            ) from exc
        except EntryNotFoundError as exc:
            if filename == hub.filename:
                raise AdapterNotFound(f"{spec}: {where}{at} has no {filename}") from exc
            if filename == SAFETENSORS_WEIGHTS_NAME:  # asked for after the repo's CONFIG_NAME was found
                # The repo may hold a pickle adapter_model.bin, or no weights at all: clair does not look.
                raise UnsafeFormatError(
                    f"{spec}: {where}{at} has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME}, the weights file "
                    "clair reads beside it",
                    hint=f"Upload the adapter as PEFT's save_pretrained writes it ({SAFETENSORS_WEIGHTS_NAME}). "
                    f"If the repo holds a pickle checkpoint (adapter_model.bin) instead: {PICKLE_HINT}",
                ) from exc
            missing = (_Missing if filename in _OPTIONAL else AdapterNotFound)(
                f"{spec}: {where}{at} has no {filename}; is it a PEFT adapter repo?",
                hint=f"A diffusers LoRA repo holds {DIFFUSERS_WEIGHTS_NAME}; for a LoRA file of another name, name "
                f"it in the source: hf://{hub.repo_id}/FILE.safetensors.",
            )
            if isinstance(missing, _Missing):  # the commit the answer is of: the next file is asked for at it
                response = getattr(exc, "response", None)
                commit = getattr(response, "headers", {}).get("X-Repo-Commit") if response is not None else None
                missing.commit = commit if isinstance(commit, str) and COMMIT_RE.match(commit) else None
            raise missing from exc
        except HfHubHTTPError as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            answer = _status(exc)
            if answer is not None:
                raise _refusal(spec, f"{filename} of {where}{at}", answer, _server_said(exc)) from exc
            raise HubError(f"{spec}: the Hub refused the request ({printable(first)})") from exc
        except HubAnswerError as exc:
            raise HubError(f"{spec}: {exc}; nothing was written from it") from exc
        except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
            raise HubError(
                f"{spec}: the Hub could not be reached or its answer is not valid HTTP "
                f"({type(exc).__name__}: {printable(str(exc)[:200])})",
                hint="Check the network and HF_ENDPOINT.",
            ) from exc
        except (OSError, ValueError) as exc:
            # ValueError: huggingface_hub refused to build a path or parse an answer.
            raise HubError(f"{spec}: download failed ({printable(str(exc)[:200])})") from exc

    config: Path | None
    if hub.filename is not None:  # the named file alone: a diffusion LoRA, or a PEFT file with --lora-alpha
        weights = get(hub.filename)
        return _ref(hub, spec, weights, None, _stale_note(hub, stale, weights))
    try:
        config = get(CONFIG_NAME)
        # The weights of the commit the config came from: a branch that moves between the two
        # downloads would pair one commit's config with another's weights.
        commit = _commit_from_path(config)
        try:
            weights = _mlx_weights(get, config, commit or hub.revision) or get(
                SAFETENSORS_WEIGHTS_NAME, commit or hub.revision
            )
        except (UnsafeFormatError, HubError) as exc:  # none in the repo, or none cached offline
            if is_peft_config(config):
                # PeftModel.from_pretrained loads such a repo's adapter_model.bin (or nothing), never its
                # adapters.safetensors: reading that one would audit another update.
                raise
            try:  # an MLX-LM adapter repo: adapters.safetensors beside its config (io.mlx)
                weights = get(MLX_WEIGHTS_NAME, commit or hub.revision)
            except (AdapterNotFound, HubError):
                raise exc from None
        if commit is not None and _commit_from_path(weights) not in (None, commit):
            raise HubError(
                f"{spec}: the Hub answered commit {_commit_from_path(weights)} for {weights.name} "
                f"and {commit} for {CONFIG_NAME}; the two files must be of one commit",
                hint="Retry, or pin the revision to a commit (owner/name@<40-hex sha>).",
            )
        if weights.name == SAFETENSORS_WEIGHTS_NAME and not offline:  # offline, diffusers guesses no file
            _check_peft_guess(hub, spec, weights, commit, token, deadline)
    except (_Missing, _NotCached) as exc:
        # The weights of the commit at which the Hub said the repo has no config: a branch that moves between the
        # two requests would read another commit's pytorch_lora_weights.safetensors, one beside a PEFT config.
        missing_at = exc.commit if isinstance(exc, _Missing) else None
        try:  # a diffusers LoRA repo: its weights file alone, read as a diffusion LoRA (io.diffusion)
            weights, config = get(DIFFUSERS_WEIGHTS_NAME, missing_at or hub.revision), None
        except (_Missing, _NotCached):
            if isinstance(exc, _Missing):
                _name_inner_adapters(exc, hub, spec, missing_at, token, deadline)
            raise exc from None
        if isinstance(exc, _NotCached) and not _known_missing(hub, CONFIG_NAME, _commit_from_path(weights)):
            # Offline, a config that is not in the cache may still be in the repo (a diffusers download of
            # the repo fetched its pytorch_lora_weights.safetensors alone): PeftModel.from_pretrained would load
            # that config's adapter_model.safetensors, another update than this file's.
            named = f"hf://{hub.repo_id}/" + (f"{hub.subfolder}/" if hub.subfolder else "") + DIFFUSERS_WEIGHTS_NAME
            raise HubError(
                f"{spec}: {CONFIG_NAME} of {where}{at} is not in the local cache and {offline} is set, so it "
                f"cannot be told whether the repo is a PEFT adapter (PeftModel.from_pretrained loads its "
                f"{SAFETENSORS_WEIGHTS_NAME}) or a diffusers LoRA (its {DIFFUSERS_WEIGHTS_NAME}, which is cached)",
                hint=f"Unset {offline} to let the Hub say, or name the diffusers file to read it alone: {named}.",
            ) from None
        if not offline:  # offline, diffusers loads no repo without a weight_name, and clair cannot list one
            _check_diffusers_guess(hub, spec, _commit_from_path(weights), token, deadline)
    return _ref(hub, spec, weights, config, _stale_note(hub, stale, config or weights))


def _stale_note(hub: HubSpec, stale: list[tuple[str, str | None]], path: Path) -> str | None:
    """The note of a hub source read from the cache because the Hub did not answer (no network) or answered an
    error status (402 at the egress limit, 5xx): huggingface_hub then reads the commit the cache last saw for the
    branch, which may be behind it."""
    if not stale:
        return None
    filename, refused = stale[0]
    said = f"answered {refused} for" if refused else "did not answer for"
    branch = hub.revision or "main"
    commit = _commit_from_path(path)
    return (
        f"the Hub {said} {filename} of {hub.repo_id}, so huggingface_hub read the cached commit "
        f"{commit or '(unknown)'} of {printable(branch)}, the last it saw: the branch may have moved on since "
        f"(pin the commit, {hub.repo_id}@<sha>, or retry with the Hub reachable)"
    )


def _name_inner_adapters(
    exc: AdapterNotFound, hub: HubSpec, spec: str, commit: str | None, token: str | None, deadline: float
) -> None:
    """Where a repo (or its subfolder) holds no adapter at its top but adapters in folders (one per client or
    round), name them in ``exc``'s hint: a hub source reads one adapter, from the folder it names."""
    try:
        names = _repo_files(hub, spec, commit, token, deadline, CONFIG_NAME)
    except (HubError, AdapterNotFound):  # the listing is a courtesy: the error stands without it
        return
    folders = sorted(
        {n.rpartition("/")[0] for n in names if n.rpartition("/")[2] in (CONFIG_NAME, DIFFUSERS_WEIGHTS_NAME)}
    )
    folders = [f for f in folders if f]
    if not folders:
        return
    base = f"hf://{hub.repo_id}/" + (f"{hub.subfolder}/" if hub.subfolder else "")
    listed = ", ".join(printable(f) for f in folders[:6]) + (", ..." if len(folders) > 6 else "")
    exc.hint = (
        f"It holds adapters in {len(folders)} folder{'s' if len(folders) > 1 else ''} ({listed}): a hub source reads "
        f"one adapter, from the folder it names: {base}{printable(folders[0])}"
        + (f"@{hub.revision}" if hub.revision else "")
        + "."
    )


def offline_variable() -> str | None:
    """The variable that puts huggingface_hub offline (``HF_HUB_OFFLINE``, or where that is unset or empty
    ``TRANSFORMERS_OFFLINE``, as huggingface_hub's own constants read them: 1, ON, YES or TRUE), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            return name if value.upper() in ("1", "ON", "YES", "TRUE") else None
    return None


def _known_missing(hub: HubSpec, filename: str, commit: str | None) -> bool:
    """Whether the hub cache records that ``filename`` (in the source's subfolder) is absent from the repo at
    ``commit`` (huggingface_hub's ``.no_exist`` marker, written when the Hub answered that it has no such file)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    if commit is None:
        return False
    name = f"{hub.subfolder}/{filename}" if hub.subfolder else filename
    try:
        return try_to_load_from_cache(hub.repo_id, name, revision=commit) is _CACHED_NO_EXIST
    except (OSError, ValueError):
        return False


def diffusers_candidates(names: list[str]) -> list[str]:
    """The names among ``names`` (a directory's entries, or a repo's file paths) of which diffusers'
    ``load_lora_weights`` loads the first when it is given no ``weight_name``
    (``diffusers.loaders.lora_base._best_guess_weight_name``): those that end with ``.safetensors`` and hold none
    of its skipped words, and of them, where any ends with ``pytorch_lora_weights.safetensors``, those alone."""
    safe = [n for n in names if n.endswith(".safetensors") and not any(w in n for w in DIFFUSERS_GUESS_SKIPPED)]
    return sorted([n for n in safe if n.endswith(DIFFUSERS_WEIGHTS_NAME)] or safe)


# A repo's file listing (the Hub's model_info answer): about 100 bytes a file.
_MAX_LISTING_BYTES = 64 << 20


def _repo_files(
    hub: HubSpec, spec: str, commit: str | None, token: str | None, deadline: float, read: str
) -> list[str]:
    """The repo's file paths at ``commit`` (those in the source's subfolder, relative to it), as diffusers lists
    the repo to pick a file (``read``: the file clair reads, named in the hint where the list cannot be had)."""
    from huggingface_hub import model_info

    try:
        info = _with_deadline(
            deadline,
            model_info,
            f"{spec}: the list of files",
            hub.repo_id,
            revision=commit or hub.revision,
            token=token,
            max_bytes=_MAX_LISTING_BYTES,
        )
        if info.siblings is None:
            raise ValueError("the answer lists no files")
        names = [s.rfilename for s in info.siblings]
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to list: nothing tells which file diffusers loads
        # An answer with an error status: its status and the Hub's message, not the error's first line (that of
        # huggingface_hub 2.5's EgressLimitError is "402 Client Error." alone).
        answer = _status(exc)
        if answer is not None:
            said = _server_said(exc)
            first = f"{answer[0]} {answer[1]}".strip() + (f": {said}" if said else "")
        else:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise HubError(
            f"{spec}: the files of {hub.repo_id} cannot be listed ({printable(first)}), so it cannot be told which "
            f"file diffusers' load_lora_weights loads from it",
            hint=f"Name the file to read: hf://{hub.repo_id}/" + (f"{hub.subfolder}/" if hub.subfolder else "") + read,
        ) from None
    if hub.subfolder:
        inner = f"{hub.subfolder}/"
        names = [n[len(inner) :] for n in names if n.startswith(inner)]
    return names


def _check_diffusers_guess(hub: HubSpec, spec: str, commit: str | None, token: str | None, deadline: float) -> None:
    """Refuse a diffusers LoRA repo (no adapter_config.json) where diffusers' ``load_lora_weights(repo)`` could
    load another file than the ``pytorch_lora_weights.safetensors`` clair reads: it lists the repo and loads
    the first file whose name ends so (``v2_pytorch_lora_weights.safetensors``,
    ``a/pytorch_lora_weights.safetensors``)."""
    found = diffusers_candidates(_repo_files(hub, spec, commit, token, deadline, DIFFUSERS_WEIGHTS_NAME))
    if found != [DIFFUSERS_WEIGHTS_NAME]:
        listed = ", ".join(printable(n) for n in found[:6]) + (", ..." if len(found) > 6 else "")
        where = f"{hub.repo_id}" + (f" (subfolder {hub.subfolder})" if hub.subfolder else "")
        raise AdapterFormatError(
            f"{spec}: {where} holds {len(found)} files that diffusers' load_lora_weights may load ({listed}): it "
            f"loads the first it lists, which need not be the {DIFFUSERS_WEIGHTS_NAME} clair would read",
            hint=f"Name the file to read as the source: hf://{hub.repo_id}/"
            + (f"{hub.subfolder}/" if hub.subfolder else "")
            + "FILE.safetensors.",
        )


PEFT_RIVALS = (
    "{where}: a diffusion transformer's PEFT adapter beside {n} other {files} that diffusers' load_lora_weights may "
    "load ({listed}): loaded without a weight_name, diffusers reads the first .safetensors file it lists (one whose "
    "name ends with pytorch_lora_weights.safetensors where there is one), which need not be the "
    f"{SAFETENSORS_WEIGHTS_NAME} clair would read (and PeftModel.from_pretrained loads)"
)


def peft_rivals(names: list[str]) -> list[str]:
    """The files among ``names`` (a PEFT adapter's folder, or repo) that diffusers' ``load_lora_weights`` may load
    instead of its ``adapter_model.safetensors`` (:func:`diffusers_candidates`)."""
    found = diffusers_candidates(names)
    return [] if found == [SAFETENSORS_WEIGHTS_NAME] else [n for n in found if n != SAFETENSORS_WEIGHTS_NAME]


def rivals_message(where: str, rivals: list[str]) -> str:
    listed = ", ".join(printable(n) for n in rivals[:6]) + (", ..." if len(rivals) > 6 else "")
    files = "file" if len(rivals) == 1 else "files"
    return PEFT_RIVALS.format(where=where, n=len(rivals), files=files, listed=listed)


def _check_peft_guess(
    hub: HubSpec, spec: str, weights: Path, commit: str | None, token: str | None, deadline: float
) -> None:
    """Refuse a repo of a diffusion transformer's PEFT adapter (clair reads its adapter_model.safetensors) where
    diffusers' ``load_lora_weights(repo)``, whose Flux.2, Krea 2, ERNIE-Image and Flux loaders read PEFT-format
    weights, could load another file: it lists the repo and loads the first ``.safetensors`` file."""
    from clair_cli.io.diffusion import diffusers_reads_peft
    from clair_cli.io.safetensors_file import read_header

    if not diffusers_reads_peft(read_header(weights)[0]):
        return  # another model's adapter (an LLM's): no diffusers loader reads it
    rivals = peft_rivals(_repo_files(hub, spec, commit, token, deadline, SAFETENSORS_WEIGHTS_NAME))
    if rivals:
        where = f"{spec}: {hub.repo_id}" + (f" (subfolder {hub.subfolder})" if hub.subfolder else "")
        raise AdapterFormatError(
            rivals_message(where, rivals),
            hint="Remove the other .safetensors files from the repo, or name the file to read as the source: "
            f"hf://{hub.repo_id}/" + (f"{hub.subfolder}/" if hub.subfolder else "") + "FILE.safetensors "
            "(a PEFT file with --config or --lora-alpha).",
        )


def is_peft_config(config: Path) -> bool:
    """Whether ``config`` reads as a PEFT adapter config (a ``peft_type``), which PeftModel.from_pretrained loads."""
    from clair_cli.io.files import parse_json, read_small

    try:
        data = parse_json(read_small(config, MAX_CONFIG_BYTES, "an adapter config"), config, "the config")
    except (AdapterFormatError, OSError):
        return False
    return isinstance(data, dict) and "peft_type" in data


def _mlx_weights(get: Any, config: Path, revision: str | None) -> Path | None:
    """An MLX-LM repo's adapters.safetensors where its config is MLX-LM's (io.mlx), read even beside an
    adapter_model.safetensors (what mlx_lm loads from the repo); None otherwise, or where the repo has none."""
    from clair_cli.io.mlx import is_mlx_config

    if not is_mlx_config(config):
        return None
    try:
        return get(MLX_WEIGHTS_NAME, revision)
    except (_Missing, _NotCached):
        return None


def _ref(hub: HubSpec, spec: str, weights: Path, config: Path | None, note: str | None = None) -> AdapterRef:
    return AdapterRef(
        name=hub.name,
        source=spec,
        weights_file=weights,
        config_file=config,
        revision=_commit_from_path(config or weights),
        repo_id=hub.repo_id,
        requested_revision=hub.revision,
        subfolder=hub.subfolder,
        note=note,
    )
