"""Zero-shot tasks for lm-evaluation-harness, defined locally and fed from offline files.

Each ``<name>.yaml`` here is an lm-eval task (``output_type: multiple_choice``, the harness's own
``acc`` / ``acc_norm``) whose data is a JSONL file in the tasks directory (``$LOAQ_TASKS_DIR``, default
``~/.cache/loaq/tasks``), written by :func:`loaq.tasks.prepare.prepare` (``loaq tasks prepare``) from
the BIG-bench 1.0.0 task files named in DATA.md §4. Nothing comes from a hub: the YAML's
``data_files`` is resolved to that directory before lm-eval sees it.
"""

from __future__ import annotations

import glob
import os

from loaq.errors import LoaQError

HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL = "run `loaq tasks prepare` (or `bash scripts/setup.sh --tasks`)"


def names() -> list[str]:
    """The task names shipped with loaq, sorted."""
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(HERE, "*.yaml")))


def tasks_dir() -> str:
    from loaq.data import cache_dir

    return os.environ.get("LOAQ_TASKS_DIR") or os.path.join(cache_dir(), "tasks")


def parse_names(spec: str) -> list[str]:
    """``"all"`` or a comma-separated list of shipped task names."""
    known = names()
    if spec == "all":
        return known
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in known]
    if unknown or not chosen:
        raise LoaQError(f"unknown task {unknown[0] if unknown else spec!r}; choose from {', '.join(known)} or 'all'")
    return chosen


def definition(name: str) -> dict:
    """The YAML of task ``name`` as shipped (``data_files`` still relative)."""
    import yaml

    path = os.path.join(HERE, f"{name}.yaml")
    if not os.path.isfile(path):
        raise LoaQError(f"unknown task {name!r}; choose from {', '.join(names())}")
    with open(path) as fh:
        return yaml.safe_load(fh)


def resolved(name: str, data_dir: str) -> dict:
    """The YAML of task ``name`` with its ``data_files`` made absolute paths in ``data_dir``."""
    cfg = definition(name)
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"] = dict(cfg["dataset_kwargs"], data_files={
        split: os.path.join(os.path.abspath(data_dir), f) for split, f in files.items()})
    return cfg


def task_config(name: str, data_dir: str | None = None) -> dict:
    """The lm-eval config of ``name`` fed from ``data_dir`` (default :func:`tasks_dir`); its data must exist."""
    cfg = resolved(name, data_dir or tasks_dir())
    missing = [f for f in cfg["dataset_kwargs"]["data_files"].values() if not os.path.isfile(f)]
    if missing:
        raise LoaQError(f"task {name!r}: data file {missing[0]} is missing; {INSTALL}")
    return cfg
