"""Agents: model references, loading and making models, token designs, prompts, the text-to-ids boundary, and
behavior selection."""
