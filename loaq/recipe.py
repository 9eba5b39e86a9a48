"""Recipes: a run's settings in a YAML or JSON file, so a run is reproducible from a file.

A recipe holds the sections of :class:`loaq.config.QuantConfig` (``spec``, ``method``, ``solver``, ``act``,
``rotation``, ``allocation``), optionally ``calibration`` (:class:`loaq.config.Calibration`) and ``model``::

    model: HuggingFaceTB/SmolLM2-135M-Instruct
    spec: {bits: 3, group_size: 0, symmetric: false, init: minmax}
    method: {name: loaq, alpha: 0.25, beta: 0.0}
    calibration: {nsamples: 128, seqlen: 2048}

The ``loaq.json`` of a finished run (or its directory) is itself a recipe: its ``config``, ``calibration``
and ``source_model`` are read, so ``loaq quantize --recipe runs/w3 --out runs/w3-again`` reproduces the codes
bit for bit. Settings given on top (flags, keyword arguments) override the recipe's; choosing another
method drops the recipe's method settings, which belong to the old one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from loaq.config import Calibration, QuantConfig
from loaq.errors import LoaQError

SECTIONS = ("spec", "method", "solver", "act", "rotation", "allocation")


@dataclass(frozen=True)
class Recipe:
    """What a run needs besides its inputs and outputs; ``calib_hash`` is the token hash of the run a
    ``loaq.json`` recipe came from (``None`` otherwise), checked when the run is reproduced."""

    config: QuantConfig
    calibration: Calibration
    model: str | None = None
    calib_hash: str | None = None

def read_raw(path: str) -> dict:
    """``{"config": {...}, "calibration": {...}, "model": ..., "hash": ...}`` of a recipe file, a
    ``loaq.json`` or a checkpoint directory holding one."""
    if os.path.isdir(path):
        path = os.path.join(path, "loaq.json")
    if not os.path.isfile(path):
        raise LoaQError(f"recipe {path!r} does not exist; pass a .yaml/.json recipe or a finished run's loaq.json")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parser error is the file's fault
        raise LoaQError(f"recipe {path!r} does not parse ({type(exc).__name__}: {str(exc).splitlines()[0]}); fix the file") from None
    return from_mapping(d, f"recipe {path!r}")


def from_mapping(d, where: str = "recipe") -> dict:
    """The raw recipe (as :func:`read_raw` returns) of a parsed recipe file, a ``loaq.json`` or a dict."""
    if not isinstance(d, dict):
        raise LoaQError(f"{where} is not a mapping of settings; see the README's recipe example")
    if "format" in d and "config" in d:  # a finished run's loaq.json
        cal = dict(d.get("calibration") or {})
        return {"config": d["config"], "calibration": cal, "model": d.get("source_model"), "hash": cal.pop("hash", None)}
    bad = sorted(set(d) - set(SECTIONS) - {"calibration", "model"})
    if bad:
        raise LoaQError(f"{where} has unknown field(s) {', '.join(bad)}; known: "
                        f"{', '.join(SECTIONS + ('calibration', 'model'))}")
    return {"config": {k: d[k] for k in SECTIONS if k in d}, "calibration": d.get("calibration") or {},
            "model": d.get("model"), "hash": None}


def build(raw: dict | None = None, overrides: dict | None = None) -> Recipe:
    """A :class:`Recipe` from a raw recipe (:func:`read_raw`) with ``overrides`` on top (same shape as the
    recipe file: sections of settings, ``calibration``, ``model``; ``None`` values are ignored)."""
    raw = raw or {"config": {}, "calibration": {}, "model": None, "hash": None}
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    for k, v in list(raw["config"].items()) + [("calibration", raw["calibration"])]:
        if v is not None and not isinstance(v, dict):
            raise LoaQError(f"recipe field {k!r} must be a mapping of settings, got {v!r}")
    config = {k: dict(v or {}) for k, v in raw["config"].items()}
    for sec in SECTIONS:
        given = {k: v for k, v in (over.get(sec) or {}).items() if v is not None}
        if sec == "method" and given.get("name") not in (None, config.get("method", {}).get("name")):
            config["method"] = {}
        config.setdefault(sec, {}).update(given)
    cal_over = {k: v for k, v in (over.get("calibration") or {}).items() if v is not None}
    cal = {**(raw["calibration"] or {}), **cal_over}
    model = over.get("model", raw.get("model"))
    if model is not None and not isinstance(model, str):
        raise LoaQError(f"recipe field 'model' must be a path or hub id, got {model!r}; fix the recipe")
    return Recipe(QuantConfig.from_dict(config), Calibration.from_dict(cal), model,
                  None if cal_over else raw.get("hash"))


def load_recipe(path: str | None, overrides: dict | None = None) -> Recipe:
    """The recipe at ``path`` (or the defaults) with ``overrides`` on top."""
    return build(read_raw(path) if path else None, overrides)
