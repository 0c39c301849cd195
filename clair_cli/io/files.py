"""Operating-system errors while reading a source, as ClairErrors naming the file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clair_cli.errors import AdapterFormatError, AdapterNotFound


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn FileNotFoundError, IsADirectoryError, PermissionError and other OSErrors
    raised in the block into AdapterNotFound / AdapterFormatError for ``path``."""
    try:
        yield
    except FileNotFoundError as exc:
        raise AdapterNotFound(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise AdapterFormatError(f"{path}: is a directory, expected a file") from exc
    except PermissionError as exc:
        raise AdapterNotFound(f"{path}: permission denied") from exc
    except OSError as exc:
        raise AdapterNotFound(f"{path}: cannot be read ({exc.strerror or exc})") from exc
