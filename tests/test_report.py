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
