"""``loaq-export``: native LoaQ checkpoint -> compressed-tensors directory, and ``--check`` of one."""

from __future__ import annotations

import argparse
import os
import sys

from loaq.cli import interruptible, interrupted, without_sklearn
from loaq.errors import LoaQError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaq-export", description="export a native LoaQ checkpoint as compressed-tensors "
                                "(pack-quantized) for vLLM / transformers, or --check an export")
    p.add_argument("native", nargs="?", help="native checkpoint directory written by `loaq quantize --out`")
    p.add_argument("out", nargs="?", help="output directory")
    p.add_argument("--check", metavar="DIR", help="validate an export instead of writing one")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the unquantized tensors (default bfloat16; weight scales keep the run's --scale-dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    return p


def run(a) -> int:
    if a.check:
        if a.native or a.out:
            raise LoaQError("--check DIR takes no other paths; run `loaq-export --check OUT_DIR`")
        from loaq.export.check import check_export

        print(check_export(a.check))
        return 0
    if not (a.native and a.out):
        raise LoaQError("give NATIVE_DIR and OUT_DIR (or --check OUT_DIR)")
    from loaq.export import DTYPES
    from loaq.export.writer import export

    files = export(a.native, a.out, dtype=DTYPES[a.dtype], force=a.force, max_shard_size=a.max_shard_size)
    print(f"wrote {a.out} ({len(files)} safetensors file(s)); verify with `loaq-export --check {a.out}`")
    return 0


@interruptible
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv is None:  # a process of its own
        without_sklearn()
    try:
        return run(a)
    except (LoaQError, KeyboardInterrupt) as exc:
        if interrupted(exc):  # the export's temporary directory is already removed
            print("interrupted; nothing was written", file=sys.stderr)
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
