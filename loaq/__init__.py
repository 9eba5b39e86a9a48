"""LoaQ: layer-wise output approximation quantization (arXiv 2509.06297)."""

__version__ = "0.1.0"
