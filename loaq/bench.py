"""What the benchmarks share: where results live, what a quality row holds and how rows are keyed,
the method vocabulary, the machine a run was on and its peak memory.

``benchmarks/*.py``, ``benchmarks/report.py`` and ``loaq plot`` (:mod:`loaq.plots`) all import this
module, so a result written by one is read by the others under the same names.

- :data:`RESULTS`, :data:`SERVE_JSON`: the results folder and the serving benchmark's file in it;
- :data:`METHOD_NAMES`: :data:`loaq.config.METHODS` plus LoaQ's variants (:data:`VARIANTS`);
  :func:`method_knobs` turns a name into ``loaq.config.Method`` arguments, :func:`canonical_method`
  reads the labels older runs wrote (``"loaq -NOA"``);
- :class:`QualityRow`, :func:`normalized`, :func:`row_key`: one measured (method, setting) of
  ``benchmarks/quality.py``, as stored, in the one vocabulary, and its identity;
- :func:`machine`, :func:`command`, :func:`utc_date`, :func:`cpu_model`, :func:`load_average`: what a
  run records about itself;
- :func:`rss_mb`, :class:`PeakRSS`: resident memory, and its peak over a block.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from typing import TypedDict

from loaq.allocation import Allocation
from loaq.config import AUTO, METHODS
from loaq.errors import LoaQError

RESULTS = os.path.join("benchmarks", "results")  # relative to the repository root
SERVE_JSON = "serve.json"  # benchmarks/serve.py's results, inside RESULTS (or its --out)

FP = "fp32"  # the unquantized model's row
# LoaQ's variants, ``loaq-<suffix>``: ``loaq.config.Method`` knobs (Algorithm 1's ŝ; the Table 5 ablations)
VARIANTS = {"alg": {"shat": "alg"}, "nosoa": {"soa": False}, "nonoa": {"rescale": False},
            "nosoa-nonoa": {"soa": False, "rescale": False}}
METHOD_NAMES = (*METHODS, *(f"loaq-{v}" for v in VARIANTS))
_LEGACY = {"loaq -NOA": "loaq-nonoa", "loaq -SOA": "loaq-nosoa", "loaq -both": "loaq-nosoa-nonoa"}  # quality.py --tables


def method_knobs(name: str) -> tuple[str, dict]:
    """``(method, knobs)`` for a name of :data:`METHOD_NAMES`: ``Method(method, **knobs)`` is that method.

    >>> method_knobs("loaq-nonoa")
    ('loaq', {'rescale': False})
    """
    if name in METHODS:
        return name, {}
    if name.startswith("loaq-") and name[5:] in VARIANTS:
        return "loaq", dict(VARIANTS[name[5:]])
    raise LoaQError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")


def canonical_method(name: str) -> str:
    """The :data:`METHOD_NAMES` (or :data:`FP`) spelling of a row's method, also for labels older runs wrote."""
    name = _LEGACY.get(name, name)
    if name != FP:
        method_knobs(name)
    return name


class QualityRow(TypedDict, total=False):
    """One row of ``benchmarks/quality.py``'s JSON (``rows``, or ``extended.rows`` of a ``--tables`` run).

    Setting: ``bits``, ``group`` (0 = per channel), ``symmetric``, ``rotate`` (``"none"`` or ``"hadamard"``),
    ``init`` (grid initialization, ``"neuqi"``; ``"minmax"`` or ``"-"`` = the default), ``act_bits`` (4 for
    W4A4; 16 = weight-only); ``--tables`` rows carry rotate/init/act_bits and ``table``, the main run's rows
    leave them out (= the defaults). Measured: ``ppl`` (ppl16k), ``zero_shot`` (lm-eval, or None),
    ``quant_seconds``, ``peak_mem_mb`` (main run only). ``alpha``/``beta``: None where the method has none.
    """

    model: str
    table: str
    method: str
    bits: int
    group: int
    symmetric: bool
    rotate: str
    init: str | None
    act_bits: int | None
    alpha: float | None
    beta: float | None
    ppl: float
    zero_shot: dict | None
    quant_seconds: float
    peak_mem_mb: float


def normalized(row: dict) -> QualityRow:
    """``row`` in the one vocabulary: canonical method, ``rotate`` always set, ``init`` None for the default
    grid and ``act_bits`` None for weight-only. Idempotent; the measured fields are kept as they are."""
    rotate = row.get("rotate") or ("hadamard" if row.get("hadamard") else "none")
    return {**row, "method": canonical_method(row["method"]), "rotate": rotate,
            "init": None if row.get("init") in (None, "-", "minmax") else row["init"],
            "act_bits": None if row.get("act_bits") in (None, 16) else row["act_bits"]}


def row_key(row: dict) -> tuple:
    """What makes two quality rows the same measurement: method, setting and α, β (not the table listing
    it, nor the results). Rows of both JSON layouts and of old and new labels compare equal."""
    r = normalized(row)
    return (r["method"], r["bits"], r.get("group"), r["rotate"], r["init"], r["act_bits"], r.get("alpha"), r.get("beta"))


def parse_ab(text: str) -> tuple:
    """A benchmark's ``--loaq-ab`` (``"0.25,0"``, ``"auto,auto"``) → (α, β): numbers as floats, ``auto`` kept."""
    return tuple(x.strip() if x.strip() == AUTO else float(x) for x in text.split(","))


def mixed_variant(row: dict) -> str | None:
    """A mixed-precision row's allocation criterion and its candidates where they are not the default, e.g.
    ``loss`` or ``loss, 2g64,3,4`` (rows from before ``--alloc-criterion`` used ``output``); None for a
    uniform row."""
    if row["kind"] == "uniform":
        return None
    c = row.get("candidates", Allocation.candidates)
    return row.get("criterion", "output") + ("" if c == Allocation.candidates else f", {c}")


def utc_date() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"1.02 0.87 0.60"`` (empty where unknown)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def machine() -> str:
    """``host (N cores, CPU model), torch X``: the machine line every results file records."""
    import torch

    return f"{platform.node()} ({os.cpu_count()} cores, {cpu_model()}), torch {torch.__version__}"


def command() -> str:
    """This process's command line as a reader would retype it: ``python -m benchmarks.kernels --device cuda``
    for a module run, ``python benchmarks/quality.py ...`` for a script."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name != "__main__" else sys.argv[:1]
    return " ".join(["python", *head, *sys.argv[1:]])


def rss_mb(session: int | None = None) -> float:
    """Resident memory in MiB: of this process, or summed over every process of ``session`` (a session id,
    e.g. a server started in a session of its own)."""
    page = os.sysconf("SC_PAGE_SIZE")
    if session is None:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page / 2**20
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session ...
            if int(fields[3]) == session:
                total += int(fields[21])  # rss, pages
        except (OSError, IndexError, ValueError):  # the process ended while being read
            continue
    return total * page / 2**20


class PeakRSS:
    """Peak of :func:`rss_mb` over a ``with`` block, sampled in a thread every ``interval`` seconds and at
    both ends; ``base`` is the level at entry, ``delta`` the peak above it (MiB)."""

    def __init__(self, session: int | None = None, interval: float = 0.02):
        self.session, self.interval = session, interval

    def __enter__(self):
        self.base = self.peak = rss_mb(self.session)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb(self.session))

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb(self.session))

    @property
    def delta(self) -> float:
        return self.peak - self.base
