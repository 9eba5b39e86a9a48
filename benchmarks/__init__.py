"""The benchmarks, run from the repository root as modules (``python -m benchmarks.quality``); what they
share is the library's :mod:`loaq.bench`."""
