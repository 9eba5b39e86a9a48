"""Plots: each function writes a non-empty PNG whose plotted arrays are the JSON's numbers, and
``loaq plot`` recognises every results file."""

import json

import matplotlib
import numpy as np
import pytest

from loaq.cli import main
from loaq.plots import layer_mse, pareto, ppl_vs_bits, serve_rows, serve_throughput, size_vs_ppl

matplotlib.use("Agg")
PNG = b"\x89PNG\r\n\x1a\n"


def png_ok(path):
    data = open(path, "rb").read()
    return data[:8] == PNG and len(data) > 5000


MSE = {"gptq W3": {"mse": [0.1, 0.4, 2.0], "mse_normed": [0.01, 0.02, 0.05]},
       "loaq W3": {"mse": [0.08, 0.3, 1.5], "mse_normed": [0.008, 0.015, 0.04]}}
ROWS = [{"method": "fp32", "bits": 32, "ppl": 13.9}, {"method": "gptq", "bits": 2, "ppl": 774819.8},
        {"method": "gptq", "bits": 3, "ppl": 47.99}, {"method": "loaq", "bits": 3, "ppl": 26.99},
        {"method": "loaq", "bits": 2, "ppl": 652.7}, {"method": "loaq", "bits": 4, "group": 64, "ppl": 15.1}]
SIZES = [{"label": "w2", "disk_bytes": 60 * 2**20, "ppl": 650.0}, {"label": "w3", "disk_bytes": 70 * 2**20, "ppl": 27.0},
         {"label": "w3-bad", "disk_bytes": 75 * 2**20, "ppl": 48.0}, {"label": "w4", "disk_bytes": 80 * 2**20, "ppl": 15.1}]
SERVE = [{"label": "bf16", "tokens_per_s": 41.5}, {"label": "w4a16", "tokens_per_s": 55.25}]


def test_layer_mse_plots_both_curves_per_series(tmp_path):
    fig = layer_mse(MSE, str(tmp_path / "m.png"))
    assert png_ok(tmp_path / "m.png")
    for ax, key in zip(fig.axes, ("mse", "mse_normed")):
        lines = ax.get_lines()
        assert [l.get_label() for l in lines] == list(MSE)
        for line, s in zip(lines, MSE.values()):
            np.testing.assert_array_equal(line.get_xydata(), np.array([[i + 1, v] for i, v in enumerate(s[key])]))


def test_ppl_vs_bits_has_one_line_per_method_and_the_fp_reference(tmp_path):
    fig = ppl_vs_bits(ROWS, str(tmp_path / "p.png"))
    assert png_ok(tmp_path / "p.png")
    [ax] = fig.axes  # one setting: one panel
    assert ax.get_yscale() == "log" and ax.get_title() == "no transform"
    lines = {l.get_label(): l.get_xydata() for l in ax.get_lines()}
    np.testing.assert_array_equal(lines["gptq"], [[2, 774819.8], [3, 47.99]])
    np.testing.assert_array_equal(lines["loaq"], [[2, 652.7], [3, 26.99]])
    np.testing.assert_array_equal(lines["loaq g64"], [[4, 15.1]])  # another grid, another line
    assert lines["fp32 (13.90)"][:, 1].tolist() == [13.9, 13.9]


# quality.py --tables rows: rotate / init / act_bits as run, the Table 5 label of older runs
TABLE_ROWS = [{"method": "fp32", "bits": 32, "group": 0, "rotate": "none", "init": "-", "act_bits": 16, "ppl": 13.9},
              *({"method": m, "bits": b, "group": 0, "rotate": rot, "init": "minmax", "act_bits": 16, "ppl": p}
                for m, rot, b, p in (("gptq", "none", 2, 6e5), ("gptq", "none", 3, 52.0), ("loaq", "none", 2, 1269.0),
                                     ("loaq", "none", 3, 28.6), ("loaq -NOA", "none", 2, 1200.0),
                                     ("gptq", "hadamard", 2, 1.4e5), ("loaq", "hadamard", 2, 245.6))),
              {"method": "loaq", "bits": 2, "group": 0, "rotate": "hadamard", "init": "neuqi", "act_bits": 16, "ppl": 49.7},
              {"method": "gptq", "bits": 4, "group": 0, "rotate": "none", "init": "minmax", "act_bits": 4, "ppl": 600.0},
              {"method": "loaq", "bits": 4, "group": 0, "rotate": "none", "init": "minmax", "act_bits": 4, "ppl": 170.0}]


def test_ppl_vs_bits_draws_one_panel_per_setting_with_a_colour_per_method(tmp_path):
    fig = ppl_vs_bits(TABLE_ROWS, str(tmp_path / "p.png"))
    assert png_ok(tmp_path / "p.png")
    assert [ax.get_title() for ax in fig.axes] == ["no transform", "Hadamard", "NeUQI + Hadamard", "W4A4"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    panels = [{l.get_label(): l for l in ax.get_lines()} for ax in fig.axes]
    got = [{k: l.get_xydata().tolist() for k, l in p.items() if not k.startswith("fp32")} for p in panels]
    assert got == [{"gptq": [[2, 6e5], [3, 52.0]], "loaq": [[2, 1269.0], [3, 28.6]], "loaq-nonoa": [[2, 1200.0]]},
                   {"gptq": [[2, 1.4e5]], "loaq": [[2, 245.6]]}, {"loaq": [[2, 49.7]]},
                   {"gptq": [[4, 600.0]], "loaq": [[4, 170.0]]}]  # each setting's points in its own panel only
    assert all(p["fp32 (13.90)"].get_xydata()[:, 1].tolist() == [13.9, 13.9] for p in panels)
    assert len({p["loaq"].get_color() for p in panels}) == 1  # a method keeps its colour across panels
    assert len({panels[0][m].get_color() for m in ("gptq", "loaq", "loaq-nonoa")}) == 3
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["gptq", "loaq", "loaq-nonoa", "fp32 (13.90)"]


def test_size_vs_ppl_scatter_and_pareto_front(tmp_path):
    ax = size_vs_ppl(SIZES, str(tmp_path / "s.png")).axes[0]
    assert png_ok(tmp_path / "s.png")
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[60, 650.0], [70, 27.0], [75, 48.0], [80, 15.1]])
    np.testing.assert_array_equal(ax.get_lines()[0].get_xydata(), [[60, 650.0], [70, 27.0], [80, 15.1]])  # w3-bad is dominated
    assert pareto([(1, 5), (2, 5), (3, 4)]) == [(1, 5), (3, 4)]


def test_serve_throughput_bars(tmp_path):
    ax = serve_throughput(SERVE, str(tmp_path / "t.png")).axes[0]
    assert png_ok(tmp_path / "t.png")
    assert [p.get_height() for p in ax.patches] == [41.5, 55.25]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16", "w4a16"]
    served = {"results": {"bf16": {"runs": {"1": {"output_throughput": 41.5}, "8": {"output_throughput": 120.0}}}}}
    assert serve_rows(served) == [{"label": "bf16 c=1", "variant": "bf16", "concurrency": 1, "tokens_per_s": 41.5},
                                  {"label": "bf16 c=8", "variant": "bf16", "concurrency": 8, "tokens_per_s": 120.0}]


def test_serve_throughput_groups_bars_by_variant_with_a_colour_per_concurrency(tmp_path):
    served = {"results": {"bf16": {"runs": {"1": {"output_throughput": 28.0}, "8": {"output_throughput": 95.4}}},
                          "w2": {"runs": {"1": {"output_throughput": 41.3}, "8": {"output_throughput": 100.8}}}}}
    ax = serve_throughput(serve_rows(served), str(tmp_path / "t.png")).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16", "w2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["c=1", "c=8"]
    bars = [(p.get_x() + p.get_width() / 2, p.get_height(), p.get_facecolor()) for p in ax.patches]
    assert [h for _, h, _ in bars] == [28.0, 41.3, 95.4, 100.8]  # c=1 for both variants, then c=8
    assert bars[0][2] == bars[1][2] != bars[2][2] == bars[3][2]
    assert bars[0][0] < bars[2][0] < 0.5 < bars[1][0] < bars[3][0]  # each variant's bars around its tick


def test_loaq_plot_writes_pngs_next_to_the_json(tmp_path, capsys):
    for name, doc in {"quality.json": {"rows": ROWS}, "exports.json": {"rows": SIZES}, "serve.json": {"rows": SERVE},
                      "a.json": {"method": "gptq", "bits": 3, "ppl": 48.0, **MSE["gptq W3"]},
                      "b.json": {"method": "loaq", "bits": 3, "hadamard": True, "ppl": 27.0, **MSE["loaq W3"]}}.items():
        (tmp_path / name).write_text(json.dumps(doc))
    files = [str(tmp_path / n) for n in ("quality.json", "exports.json", "serve.json", "a.json", "b.json")]
    assert main(["plot", *files]) == 0
    want = ["quality.ppl_bits.png", "exports.size_ppl.png", "serve.serve.png", "layer_mse.png"]
    assert all(png_ok(tmp_path / w) for w in want)
    assert capsys.readouterr().out.split() == [x for w in want for x in ("wrote", str(tmp_path / w))]


@pytest.mark.parametrize("content", ["{}", "not json"])
def test_loaq_plot_refuses_files_without_results(tmp_path, capsys, content):
    (tmp_path / "x.json").write_text(content)
    assert main(["plot", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "x.json" in err and "\n" not in err
