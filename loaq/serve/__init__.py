"""Serving LoaQ checkpoints with vLLM: the plugin (:mod:`.plugin`), its quantization scheme
(:mod:`.scheme`), linear kernels (:mod:`.kernels`) and ``loaq serve`` (:mod:`.server`).

Nothing here imports vLLM at package import time; :func:`loaq.serve.plugin.register` does.
"""
