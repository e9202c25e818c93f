"""tessera's runtime: the heterogeneous model, its KV cache, checkpoints, and generation."""

from tessera.runtime.loader import CheckpointError, load_model, save_model

__all__ = ["CheckpointError", "load_model", "save_model"]
