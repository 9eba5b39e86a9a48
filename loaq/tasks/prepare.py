"""``loaq tasks prepare``: BIG-bench 1.0.0 task files -> the JSONL the local lm-eval tasks read.

DATA.md §4: the ``bigbench==1.0.0`` sdist (358 MB, Apache-2.0) is fetched with pip (never installed:
it needs tensorflow) and only three ``task.json`` files are read from it. Each example
``{input, target_scores}`` becomes one JSONL line ``{input, choices, gold}`` in file order:
``input`` stripped, ``choices`` the continuations ``" " + choice.strip()`` in ``target_scores`` order,
``gold`` the index of the first choice scored 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile

from loaq.errors import LoaQError
from loaq.tasks import names, resolved, tasks_dir

SDIST = "bigbench==1.0.0"
OLD_PIP = "23.2"
SDIST_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
SOURCES = {  # task name -> task.json below benchmark_tasks/
    "bb_social_iqa": "social_iqa/task.json",
    "bb_step_inference": "goal_step_wikihow/step_inference/task.json",
    "bb_goal_inference": "goal_step_wikihow/goal_inference/task.json",
}


def convert(task: dict) -> list[dict]:
    """BIG-bench multiple-choice examples -> ``{input, choices, gold}`` rows, in file order."""
    rows = []
    for ex in task["examples"]:
        scores = list(ex["target_scores"].values())
        rows.append({"input": ex["input"].strip(),
                     "choices": [" " + c.strip() for c in ex["target_scores"]],
                     "gold": scores.index(max(scores))})
    return rows


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True)


def fetch_sdist(dest: str) -> str:
    """Download the BIG-bench sdist with pip into ``dest`` (no install, no dependencies); its path.

    pip >= 24 refuses the sdist's metadata (it declares a direct-URL dependency), so the download runs
    with pip 23.2, itself fetched as a wheel and run from it (``python pip.whl/pip``), never installed.
    """
    print(f"downloading the {SDIST} sdist (358 MB) with pip {OLD_PIP} ...", file=sys.stderr)
    done = _pip(["-m", "pip", "download", "--no-deps", f"pip=={OLD_PIP}", "-d", dest])
    wheel = os.path.join(dest, f"pip-{OLD_PIP}-py3-none-any.whl")
    if done.returncode == 0 and os.path.isfile(wheel):
        done = _pip([os.path.join(wheel, "pip"), "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", dest])
    path = os.path.join(dest, "bigbench-1.0.0.tar.gz")
    if done.returncode != 0 or not os.path.isfile(path):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LoaQError(f"pip could not download {SDIST} ({tail}); download it yourself and pass --source FILE")
    return path


def read_tasks(source: str) -> dict[str, dict]:
    """The task JSONs of every shipped task from an sdist (``.tar.gz``) or a ``benchmark_tasks`` directory."""
    if os.path.isdir(source):
        out = {}
        for name, rel in SOURCES.items():
            path = os.path.join(source, rel)
            if not os.path.isfile(path):
                raise LoaQError(f"{source!r} has no {rel}; pass BIG-bench's benchmark_tasks directory or its sdist")
            with open(path) as fh:
                out[name] = json.load(fh)
        return out
    if not tarfile.is_tarfile(source):
        raise LoaQError(f"{source!r} is neither a directory nor a .tar.gz; pass the {SDIST} sdist or its benchmark_tasks directory")
    wanted = {f"{SDIST_ROOT}/{rel}": name for name, rel in SOURCES.items()}
    out = {}
    with tarfile.open(source, "r:gz") as tar:
        for member in tar:  # one sequential pass over the 358 MB archive
            if member.name in wanted:
                out[wanted[member.name]] = json.load(tar.extractfile(member))
                if len(out) == len(wanted):
                    break
    if len(out) != len(wanted):
        missing = sorted(set(wanted.values()) - set(out))
        raise LoaQError(f"{source!r} lacks the task file of {missing[0]}; pass the {SDIST} sdist")
    return out


def prepare(out_dir: str | None = None, source: str | None = None, force: bool = False) -> str:
    """Write ``<task>.jsonl`` for every shipped task into ``out_dir`` (default the tasks directory), plus
    a copy of each YAML with absolute ``data_files`` so ``lm_eval --include_path out_dir`` runs them too."""
    import yaml

    from loaq.checkpoint import atomic_dir

    out_dir = out_dir or tasks_dir()
    assert sorted(SOURCES) == names(), "every shipped YAML needs a BIG-bench source"
    with tempfile.TemporaryDirectory(prefix="loaq-bigbench-") as tmp:
        tasks = read_tasks(source or fetch_sdist(tmp))
        with atomic_dir(out_dir, force, prefix=".loaq-tasks-") as work:
            for name, task in tasks.items():
                with open(os.path.join(work, f"{name}.jsonl"), "w") as fh:
                    for row in convert(task):
                        fh.write(json.dumps(row) + "\n")
            for name in tasks:
                with open(os.path.join(work, f"{name}.yaml"), "w") as fh:
                    yaml.safe_dump(resolved(name, out_dir), fh, sort_keys=False)
    return out_dir
