"""A Flower App: federated LoRA fine-tuning of a tiny model, aggregated by clair's ClairStrategy."""
