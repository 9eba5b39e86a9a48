"""Where the calibration streams live between the layers (issue #14): the storage policy, in one place.

The pipeline (:mod:`loaq.pipeline`) keeps, per calibration batch, the quantized stream ``ĥ``, the float
stream ``h`` (two-stream methods) and the quantized sub-layer's ``X̂`` (the input of ``W_out``, kept from
the statistics pass to advance ``ĥ`` once ``W_out`` is solved), plus the keyword arguments the decoder
passes its layers. It reads and writes them batch by batch through :class:`Stream` ``get(b)`` /
``set(b, x)``, so where they live is decided here only:

- ``device``: on the compute device (fastest; what a run did before this module);
- ``cpu``: in CPU memory, moved to the device one batch at a time (pinned memory and ``non_blocking``
  copies when the device is CUDA);
- ``disk``: one file per batch in a scratch directory (the run's work directory when it has one),
  written on ``set`` and read back through a private memory map on ``get``, so resident memory holds
  one batch at a time and the page cache the rest.

Storage dtype ``float32`` (default) or ``bfloat16`` (half the memory; the codes change slightly:
``benchmarks/results/stream_dtype.md``). ``get`` always returns float32 on the compute device, so the
math (norms, residual sums, ``H``, ``C``, ``B``) stays float32; the storage policy never changes codes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from loaq.errors import LoaQError

OFFLOADS = ("device", "cpu", "disk")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StreamOptions:
    """Storage of the streams (``offload``, ``dtype``), how often ``--resume`` state saves them
    (``checkpoint_every`` layers; 0: only when interrupted) and the dtype of the forward passes
    (``compute_dtype``; statistics stay float32).

    ``offload`` and ``checkpoint_every`` never change the codes; ``dtype`` and ``compute_dtype`` do, so
    :meth:`digest_fields` puts them in the run's digest when they are not float32."""

    offload: str = "device"
    dtype: str = "float32"
    checkpoint_every: int = 8
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.offload not in OFFLOADS:
            raise LoaQError(f"--offload-streams {self.offload!r} is unknown; use one of {', '.join(OFFLOADS)}")
        if self.dtype not in DTYPES:
            raise LoaQError(f"--stream-dtype {self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LoaQError(f"--compute-dtype {self.compute_dtype!r} is unknown; use one of {', '.join(COMPUTE_DTYPES)}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise LoaQError(f"--stream-checkpoint-every {self.checkpoint_every!r} is not a layer count ≥ 0; "
                            "use e.g. 8 (0 saves the streams only when interrupted)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def digest_fields(self) -> dict:
        """The settings that change the codes, when not the float32 defaults (so older digests stand)."""
        return {k: v for k, v in (("stream_dtype", self.dtype), ("compute_dtype", self.compute_dtype))
                if v != "float32"}


def _to(obj, device, dtype: torch.dtype | None = None, non_blocking: bool = False):
    """``obj`` (a tensor, or tuples/lists/dicts of them) on ``device``; floating tensors cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        dt = dtype if dtype is not None and obj.is_floating_point() else obj.dtype
        return obj.to(device, dt, non_blocking=non_blocking)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, device, dtype, non_blocking) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype, non_blocking) for k, v in obj.items()}
    return obj


def _pinned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A pinned CPU copy of ``x`` (device → host without blocking; the next device use orders after it)."""
    out = torch.empty(x.shape, dtype=dtype, device="cpu", pin_memory=True)
    return out.copy_(x.to(dtype), non_blocking=True)  # cast on the device, then a plain pinned copy


class Stream:
    """One per-batch tensor list under a storage policy: ``get(b)`` float32 on the compute device, ``set(b, x)``."""

    def __init__(self, name: str, n_batches: int, opts: StreamOptions, device, scratch: str | None = None):
        self.name, self.opts, self.device = name, opts, torch.device(device)
        self.dtype = opts.torch_dtype
        self.items: list = [None] * n_batches  # device/cpu: tensors; disk: (shape, path)
        self.scratch = scratch
        self.cuda = self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.items)

    def set(self, b: int, x: torch.Tensor) -> None:
        """Store batch ``b`` (a new tensor each time: a tensor ``get`` returned is never written in place)."""
        x = x.detach()
        if self.opts.offload == "device":
            self.items[b] = x.to(self.device, self.dtype)  # (a resumed run's streams come from CPU)
        elif self.opts.offload == "cpu":
            self.items[b] = _pinned(x, self.dtype) if self.cuda else x.to("cpu", self.dtype)
        else:
            # a new file renamed over the old one: a tensor ``get`` mapped from the old file keeps its values
            path = os.path.join(self.scratch, f"{self.name}.{b:05d}.bin")
            data = x.to("cpu", self.dtype).contiguous()
            with open(path + ".tmp", "wb") as fh:
                fh.write(data.view(torch.uint8).numpy().data)
            os.replace(path + ".tmp", path)
            self.items[b] = (tuple(data.shape), path)

    def stored(self, b: int) -> torch.Tensor:
        """Batch ``b`` as stored (storage dtype, on the device or CPU; a memory-mapped copy for ``disk``)."""
        item = self.items[b]
        if self.opts.offload != "disk":
            return item
        shape, path = item
        n = 1
        for s in shape:
            n *= s
        return torch.from_file(path, shared=False, size=n, dtype=self.dtype).view(shape)

    def get(self, b: int) -> torch.Tensor:
        """Batch ``b`` in float32 on the compute device."""
        return self.stored(b).to(self.device, non_blocking=self.cuda).float()  # copied as stored, cast on the device

    def cpu(self) -> Iterable[torch.Tensor]:
        """Every batch on CPU in the storage dtype, one at a time (for the ``--resume`` state)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for b in range(len(self.items)):
            yield self.stored(b).to("cpu")

    def __getitem__(self, b: int) -> torch.Tensor:  # list-style access (the MoE sub-layer, :mod:`loaq.moe`)
        return self.get(b)

    def __setitem__(self, b: int, x: torch.Tensor) -> None:
        self.set(b, x)

    def __iter__(self):
        return (self.get(b) for b in range(len(self.items)))

    def copy_from(self, other: Stream) -> None:
        """This stream := ``other`` (Qronos' per-layer reset of the float stream)."""
        for b in range(len(other)):
            self.set(b, other.get(b))


class Streams:
    """The streams entering the current layer: float ``h`` (None for single-stream methods), quantized
    ``h_hat``, the scratch ``x_hat`` (``W_out``'s quantized inputs) and the per-batch layer kwargs.

    ``at_layer``: the layer the streams enter when every batch is at that boundary, ``None`` while a
    layer is advancing them (so an interruption knows whether they can be saved for ``--resume``)."""

    def __init__(self, n_batches: int, two: bool, opts: StreamOptions, device, workdir: str | None = None):
        self.opts, self.device = opts, torch.device(device)
        self._own_scratch = None
        scratch = None
        if opts.offload == "disk":
            if workdir:
                scratch = os.path.join(workdir, "scratch")
                os.makedirs(scratch, exist_ok=True)
            else:
                scratch = self._own_scratch = tempfile.mkdtemp(prefix="loaq-streams-")
        self.scratch = scratch
        self.h = Stream("h", n_batches, opts, device, scratch) if two else None
        self.h_hat = Stream("h_hat", n_batches, opts, device, scratch)
        self.x_hat = Stream("x_hat", n_batches, opts, device, scratch)
        self._kwargs: list[list[dict] | dict] = [{}] * n_batches
        self.kw_layer = 0  # the decoder layer whose kwargs :meth:`kwargs` returns (they differ by layer type)
        self.at_layer: int | None = 0
        self.held = 0  # the last ``held`` batches advance with the others but stay out of H, C, B (a probe scores them)

    def __len__(self) -> int:
        return len(self.h_hat)

    def set_kwargs(self, b: int, kw: list[dict] | dict) -> None:
        """Batch ``b``'s layer kwargs: one dict per decoder layer (:func:`loaq.pipeline.capture_inputs`), or one for all."""
        self._kwargs[b] = kw if self.opts.offload == "device" else \
            _to(kw, "cpu") if self.device.type != "cuda" else _pin_all(kw)

    def kwargs(self, b: int, dtype: torch.dtype = torch.float32) -> dict:
        """Batch ``b``'s kwargs of layer :attr:`kw_layer` on the compute device, floating tensors in ``dtype``
        (the forward's)."""
        kw = self._kwargs[b]
        kw = kw[self.kw_layer] if isinstance(kw, list) else kw
        return _to(kw, self.device, dtype, non_blocking=self.device.type == "cuda")

    def close(self) -> None:
        """Remove the disk scratch files."""
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _pin_all(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to("cpu").pin_memory()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_pin_all(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _pin_all(v) for k, v in obj.items()}
    return obj
