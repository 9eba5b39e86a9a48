"""Quantized-linear kernels for serving LoaQ checkpoints (``pack-quantized`` format).

Each kernel is a class of the protocol in :mod:`loaq.kernels.kernel` (``can_implement``, a one-time
repack, ``apply``); :mod:`loaq.kernels.dispatch` holds the ordered list and the entry points
(``prepare_linear``, ``apply_linear``); :mod:`loaq.kernels.op` wraps them in the torch custom op
``loaq::linear`` and the module ``QuantLinear`` (what torch.compile sees).
Each kernel ``<k>.py`` has a plain-torch ``<k>_ref.py`` of identical semantics; the Triton kernels share
:mod:`loaq.kernels.triton_common`; the CPU kernels' C++ is ``csrc/cpu_kernels.cpp``. Weight layouts are
documented in :mod:`loaq.kernels.layout`. Nothing here imports Triton or compiles C++ at import time.
"""
