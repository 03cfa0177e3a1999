"""GGUF export (in progress): ggml block packers; the container writer and model mapping come next."""

from .blocks import BLOCK_PACKERS, pack_blocks

__all__ = ["BLOCK_PACKERS", "pack_blocks"]
