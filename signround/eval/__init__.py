"""Evaluation: perplexity on local text files."""

from .perplexity import perplexity, read_text

__all__ = ["perplexity", "read_text"]
