"""LoaQ: layer-wise output approximation quantization (arXiv 2509.06297).

The Python API (:mod:`loaq.api`), importable from here without loading torch until first use::

    import loaq
    run = loaq.quantize("path/to/model", loaq.QuantConfig(spec=loaq.GridSpec(4, 64)), out="runs/w4")
"""

__version__ = "0.1.0"

_API = {
    "quantize": "loaq.api", "load": "loaq.api", "evaluate": "loaq.api", "Evaluation": "loaq.api",
    "QuantizeResult": "loaq.api", "Loaded": "loaq.api",
    "QuantConfig": "loaq.config", "Method": "loaq.config", "Calibration": "loaq.config",
    "GridSpec": "loaq.grids", "SolverOptions": "loaq.solver", "ActSpec": "loaq.actquant",
    "RotationSpec": "loaq.rotation", "Recipe": "loaq.recipe", "load_recipe": "loaq.recipe",
    "LoaQError": "loaq.errors", "StreamOptions": "loaq.streams",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'loaq' has no attribute {name!r}")
