"""benchmarks/report.py: REPORT.md is generated from the results JSON: measured rows carry their numbers
and run, unmeasured ones say so, and the claims table compares LoaQ with the best baseline."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zs(acc):
    return {"tasks": {"bb_social_iqa": {"acc": acc, "acc_norm": acc}}, "average": {"acc": acc, "acc_norm": acc}}


def test_report_from_results(tmp_path):
    rows = [{"method": "fp32", "bits": 32, "group": 0, "ppl": 13.9, "zero_shot": zs(0.40)},
            {"method": "gptq", "bits": 2, "group": 0, "ppl": 774819.8, "zero_shot": zs(0.30)},
            {"method": "qronos", "bits": 2, "group": 0, "ppl": 4673.8, "zero_shot": zs(0.33)},
            {"method": "loaq", "bits": 2, "group": 0, "ppl": 652.7, "zero_shot": zs(0.32)},
            {"method": "loaq", "bits": 3, "group": 0, "ppl": 26.99}]
    (tmp_path / "q.json").write_text(json.dumps({"command": "python benchmarks/quality.py --zero-shot", "date": "d",
                                                 "nsamples": 32, "seqlen": 512, "rows": rows,
                                                 "zero_shot": {"tasks": ["bb_social_iqa"], "limit": 250, "harness": "lm-eval x"}}))
    older = [{"method": "loaq", "bits": 2, "group": 0, "ppl": 600.0}, {"method": "gptq", "bits": 2, "group": 0, "ppl": 7e5}]
    (tmp_path / "p.json").write_text(json.dumps({"command": "python benchmarks/quality.py", "date": "c", "rows": older}))
    split = {"command": "python benchmarks/quality.py --zero-shot --no-fp --methods gptaq", "date": "e", "nsamples": 32,
             "seqlen": 512, "zero_shot": json.loads((tmp_path / "q.json").read_text())["zero_shot"],
             "rows": [{"method": "gptaq", "bits": 2, "group": 0, "ppl": 9999.0, "zero_shot": zs(0.34)}]}
    (tmp_path / "r.json").write_text(json.dumps(split))  # the same table's other process: merged into run a
    out = tmp_path / "REPORT.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--results", str(tmp_path),
                    "--out", str(out)], check=True, capture_output=True)
    md = out.read_text()
    assert "| fp32 | a | 13.90 | 40.0 | 40.0 |" in md and "| gptq | a | 774,820 | 30.0 | 30.0 |" in md
    assert "| loaq | a | **652.70** | 32.0 | 32.0 |" in md
    assert "| loaq | b | **600.00** | - |" in md and "| gptq | b | 700,000 | - |" in md  # the other run: its own block
    assert "| gptaq | a | 9,999 | **34.0** | 34.0 |" in md and "| qronos | a | 4,674 | 33.0 | 33.0 |" in md
    assert "| lloa | - | not measured yet | not measured yet | not measured yet |" in md
    assert "Table 2: 2- and 3-bit channel-wise with the Hadamard transform (paper Table 2)\n\nNot measured yet" in md
    assert "| W2 per-channel | ppl ↓ | 652.70 | qronos 4,674 | a | yes |" in md
    assert "| W2 per-channel | avg acc ↑ | 32.0 | gptaq 34.0 | a | no |" in md
    assert ("- **a**: `python benchmarks/quality.py --zero-shot` and `python benchmarks/quality.py --zero-shot --no-fp "
            "--methods gptaq` (q.json, r.json" in md) and (tmp_path / "q.ppl_bits.png").stat().st_size > 5000
    assert "![perplexity vs bits, q.json](q.ppl_bits.png)" in md


def test_report_shows_the_serving_results_where_serve_py_writes_them(tmp_path):
    """benchmarks/serve.py writes ``<results>/serve.json`` (loaq.bench.SERVE_JSON); the report reads that file."""
    from loaq.bench import SERVE_JSON

    run = lambda tps: {"output_throughput": tps}  # noqa: E731
    doc = {"meta": {"command": "python -m benchmarks.serve", "machine": "m", "vllm": "0.32.0", "torch": "t",
                    "date": "2026-11-24 09:38 UTC", "input_len": 128, "output_len": 128},
           "results": {"bf16": {"kernel": "vLLM dense bf16", "runs": {"1": run(28.03), "8": run(95.4)}, "peak_rss_gib": 4.05},
                       "loaq-w2": {"kernel": "LoaQ C++ (plugin)", "runs": {"1": run(41.25)}, "peak_rss_gib": 3.81}}}
    (tmp_path / SERVE_JSON).write_text(json.dumps(doc))
    out = tmp_path / "REPORT.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--results", str(tmp_path),
                    "--out", str(out)], check=True, capture_output=True)
    md = out.read_text()
    assert "Serving tokens/s: not measured yet" not in md
    png = os.path.splitext(SERVE_JSON)[0] + ".serve.png"
    assert f"![serving tokens/s]({png})" in md and (tmp_path / png).stat().st_size > 5000
    assert "| variant | kernel | c=1 | c=8 | peak server RSS GiB |" in md
    assert "| bf16 | vLLM dense bf16 | 28.0 | 95.4 | 4.05 |" in md and "| loaq-w2 | LoaQ C++ (plugin) | 41.2 | - | 3.81 |" in md


def test_benchmark_row_helpers():
    """``--loaq-ab`` gives numbers as floats (``Method`` refuses numeric strings) and keeps ``auto``; a mixed
    row's variant names its criterion, and its candidates only where they are not the default."""
    from loaq.bench import mixed_variant, parse_ab

    assert parse_ab("0.25,0") == (0.25, 0.0) and parse_ab("auto, auto") == ("auto", "auto")
    assert mixed_variant({"kind": "uniform"}) is None
    assert mixed_variant({"kind": "mixed"}) == "output"  # rows from before --alloc-criterion
    assert mixed_variant({"kind": "mixed", "criterion": "loss", "candidates": "2,3,4"}) == "loss"
    assert mixed_variant({"kind": "mixed", "criterion": "loss", "candidates": "2,2g64,3,4"}) == "loss, 2,2g64,3,4"


def test_table5_ablation_rows_follow_the_loaq_beta():
    """Table 5's -SOA / -both rows run where LoaQ's β can be non-zero (``auto`` or a number) and are skipped at
    β = 0, where the SOA term β·H⁻¹B vanishes (bit-identical to LoaQ / -NOA); a no-SOA row never gets a β."""
    from benchmarks.quality import TABLES, _loaq_method
    from loaq.config import Method

    labels = [label for _, _, _, methods in TABLES["5"] for label, _ in methods]
    assert labels.count("loaq -SOA") == 2 and labels.count("loaq -both") == 2
    nosoa = Method("loaq", soa=False)
    assert _loaq_method(nosoa, "0.25,0") is None
    for ab in (None, "auto,auto", "0.5,0.25"):
        m = _loaq_method(nosoa, ab)
        assert m is not None and m.beta == 0.0 and not m.soa
    assert _loaq_method(Method("loaq"), "0.5,0.25") == Method("loaq", alpha=0.5, beta=0.25)
    assert _loaq_method(Method("loaq", rescale=False), None) == Method("loaq", rescale=False)
