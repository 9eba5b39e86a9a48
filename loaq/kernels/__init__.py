"""Quantized-linear kernels for serving LoaQ checkpoints (``pack-quantized`` format).

Entry points live in :mod:`loaq.kernels.dispatch` (``prepare_linear``, ``apply_linear``);
:mod:`loaq.kernels.op` wraps them in the torch custom op ``loaq::linear`` and the module
``QuantLinear`` (what torch.compile sees).
Each kernel ``<k>.py`` has a plain-torch ``<k>_ref.py`` of identical semantics; weight
layouts are documented in :mod:`loaq.kernels.layout`. Nothing here imports Triton or
compiles C++ at import time.
"""
