"""vlmguard: faster (visual-token pruning) and more truthful (hallucination-reducing decoding) LVLMs."""
__version__ = "0.1.0"
