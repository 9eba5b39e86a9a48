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
    out = tmp_path / "REPORT.md"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), "--results", str(tmp_path),
                    "--out", str(out)], check=True, capture_output=True)
    md = out.read_text()
    assert "| gptq | 774,820 <sup>a</sup> | 30.0 | 30.0 |" in md
    assert "| loaq | **652.70** <sup>a</sup> | 32.0 | 32.0 |" in md and "| qronos | 4,674 <sup>a</sup> | **33.0** | 33.0 |" in md
    assert "| gptaq | not measured yet | - | - |" in md
    assert "Table 2: 2- and 3-bit channel-wise with the Hadamard transform (paper Table 2)\n\nNot measured yet" in md
    assert "| W2 per-channel | ppl ↓ | 652.70 | qronos 4,674 | yes |" in md
    assert "| W2 per-channel | avg acc ↑ | 32.0 | qronos 33.0 | no |" in md
    assert "`python benchmarks/quality.py --zero-shot`" in md and (tmp_path / "q.ppl_bits.png").stat().st_size > 5000
    assert "![perplexity vs bits, q.json](q.ppl_bits.png)" in md
