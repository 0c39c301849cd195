"""Test-side access to the synthetic pools (they live in the package for the benchmarks too)."""

from clair_cli.core.synthetic import flagged, make_module, make_pool

__all__ = ["flagged", "make_module", "make_pool"]
