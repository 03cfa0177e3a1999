"""GGUF export: ggml block packers, the model-family tables, tokenizer metadata and the file writer."""

from .blocks import BLOCK_PACKERS, pack_blocks
from .exporter import EXPORTERS, GGUFExporter

__all__ = ["BLOCK_PACKERS", "pack_blocks", "EXPORTERS", "GGUFExporter"]
