"""Sources to factors, and results to files. Knows nothing of the CLAIR math."""

from clair_cli.io.adapter import Adapter, ModuleSpec
from clair_cli.io.sources import SourceOptions, open_adapter, open_adapters, resolve_sources

__all__ = ["Adapter", "ModuleSpec", "SourceOptions", "open_adapter", "open_adapters", "resolve_sources"]
