"""The one error tree of clair. Stdlib only.

Every error a user can cause (a missing file, a corrupt tensor, adapters that do
not fit together) is a ``ClairError``; the CLI turns it into ``Error: ...`` on
stderr and exit code 2. Anything else is a bug: the CLI says so in one line
(``CLAIR_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations


class ClairError(Exception):
    """Base class of every error caused by input rather than by a bug."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:
        # Pickled with its hint (an error raised in a Ray worker reaches the driver whole).
        return (_rebuild, (type(self), self.message, self.hint))


def _rebuild(kind: type[ClairError], message: str, hint: str | None) -> ClairError:
    return kind(message, hint=hint)


class AdapterNotFound(ClairError):
    """A source names nothing that exists: a path, a hub repo, a revision, a file."""


class AdapterFormatError(ClairError):
    """A source exists but is not a readable LoRA adapter (bad config, corrupt tensors)."""


class UnsafeFormatError(AdapterFormatError):
    """A pickle checkpoint, or a path that escapes its source; never opened."""


class IncompatibleAdapters(ClairError):
    """Adapters that cannot be analysed together (base model, shapes, modules)."""


class HubError(ClairError):
    """The Hugging Face Hub could not be reached or refused the request."""


class UsageError(ClairError):
    """Options that contradict each other or name something invalid."""


class OutputError(ClairError):
    """An output cannot be written (exists without --force, read-only location)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and ``__exit__`` cleans up."""

    exit_code = 143  # 128 + SIGTERM, as shells report it


def interrupt_cause(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that ``exc`` is, or was raised because of.

    A KeyboardInterrupt that lands while a class body is being built (torch's import does
    this a lot) reaches us wrapped, e.g. as ``RuntimeError: Error calling __set_name__``.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
