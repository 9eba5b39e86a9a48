"""Kernel tests run Triton natively on a GPU, else under TRITON_INTERPRET=1 on CPU.

``triton.jit`` reads TRITON_INTERPRET when it decorates a kernel, i.e. when a
``loaq.kernels`` Triton module is first imported, so it is set here, before the
test modules import them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
