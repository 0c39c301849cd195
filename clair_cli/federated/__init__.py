"""CLAIR in federated learning: one round's math (:mod:`.rounds`, no Flower needed) and
Flower's strategy on top of it (:mod:`.flower`, extra ``clair-lora[flower]``).

Importing this package never imports ``flwr``; ``clair_cli.federated.flower`` does.
"""

from clair_cli.federated.rounds import (
    TOO_FEW_CHOICES,
    WEIGHT_CAP,
    RoundResult,
    TooFew,
    aggregate_round,
    capped_weights,
    client_update,
    geometric_median_weights,
)

__all__ = [
    "TOO_FEW_CHOICES",
    "WEIGHT_CAP",
    "RoundResult",
    "TooFew",
    "aggregate_round",
    "capped_weights",
    "client_update",
    "geometric_median_weights",
]
