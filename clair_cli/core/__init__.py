"""The CLAIR mathematics on factor tensors. Imports torch, numpy and scipy only.

Nothing here reads files or prints: inputs are factors (A, B, scale) per
adapter, outputs are tensors and small result objects.
"""
