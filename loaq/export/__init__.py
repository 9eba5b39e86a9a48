"""Export a native LoaQ checkpoint as a compressed-tensors (``pack-quantized``) Hugging Face directory.

- :mod:`loaq.export.scheme`: per-layer grids -> compressed-tensors ``QuantizationConfig``;
- :mod:`loaq.export.pack`: one layer's codes -> ``weight_packed`` / ``weight_scale`` / ``weight_zero_point``;
- :mod:`loaq.export.writer`: the output directory (shards, config, tokenizer, model card);
- :mod:`loaq.export.check`: ``loaq-export --check``;
- :mod:`loaq.export.layouts`: the bit layouts of compressed-tensors <= 0.17 and 0.18-0.20, read and written.
"""

import torch

# export dtypes of the unquantized tensors (--export-dtype); here, not in the writer, so that a quantize run
# that checks its settings or sizes does not import compressed-tensors (1.6 s of every `loaq quantize`)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
