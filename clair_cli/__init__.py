"""clair: audit and merge many LoRA adapters of one base model with CLAIR.

The package is layered: ``core`` is pure tensor math, ``io`` turns sources into
factors and results into files, ``report`` renders results, ``cli`` wires them.
"""

__version__ = "0.1.0"
