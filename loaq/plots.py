"""Plots of measured results (matplotlib, PNG written next to the JSON they come from).

One function per picture, each taking the JSON's data, writing ``out`` and returning the figure so
callers (and tests) can read the plotted arrays back:

- :func:`layer_mse`: per-layer hidden-state MSE, unnormalized and after ``Norm`` (the paper's
  Figures 3 and 4), one line per checkpoint (``loaq eval --mse --json``);
- :func:`ppl_vs_bits`: perplexity against weight bits, one panel per setting (transform, grid initialization,
  activation bits), one colour per method (``benchmarks/quality.py``);
- :func:`size_vs_ppl`: model size on disk against perplexity over exported variants, with the Pareto front;
- :func:`serve_throughput`: serving tokens/s per variant;
- :func:`peak_memory_vs_params`: peak RSS while quantizing against parameter count (``benchmarks/scale.py``).

:func:`plot_files` (``loaq plot RESULTS...``) recognises each JSON by its keys and draws what it holds.
"""

from __future__ import annotations

import json
import os

from loaq.bench import FP, METHOD_NAMES, mixed_variant, normalized
from loaq.errors import LoaQError


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise LoaQError("matplotlib is not installed; run `pip install -e '.[eval]'`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str):
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(out, dpi=120)
    return fig


def layer_mse(series: dict[str, dict[str, list[float]]], out: str):
    """``series``: label -> ``{"mse": [...], "mse_normed": [...]}`` (one value per decoder layer)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("mse", "mse_normed"), ("hidden state", "after Norm (eq. 1)")):
        for label, s in series.items():
            ax.plot(range(1, len(s[key]) + 1), s[key], marker=".", label=label)
        ax.set(yscale="log", xlabel="decoder layer", ylabel="MSE vs full precision", title=f"Per-layer MSE, {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, out)


def _setting(r: dict) -> tuple:
    """A normalized row's setting besides the weight bits, sorting as the panels go: no transform, Hadamard,
    NeUQI, NeUQI + Hadamard, then quantized activations (W4A4) without and with Hadamard."""
    return r["act_bits"] or 0, r["init"] or "", r["rotate"] != "none", r["rotate"]


def _setting_title(setting: tuple, bits: list[int]) -> str:
    act, init, _, rotate = setting
    words = [f"W{bits[0]}A{act}" if len(bits) == 1 else f"A{act}"] if act else []
    words += [{"neuqi": "NeUQI"}.get(init, init)] if init else []
    words += [rotate.capitalize()] if rotate != "none" else []
    return " + ".join(words) or "no transform"


def _plain_log_ticks(ax):
    """Log-axis labels as plain numbers (26, 1,000); minor ticks labelled within one decade, only 2·10ⁿ and 5·10ⁿ
    within three, none beyond."""
    from matplotlib.ticker import FuncFormatter

    text = lambda v: f"{v:,.0f}" if v >= 100 else f"{v:g}"  # noqa: E731
    lo, hi = ax.get_ylim()
    some = lambda v: text(v) if hi / lo < 10 or (hi / lo < 1000 and f"{v:e}"[0] in "25") else ""  # noqa: E731
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: text(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: some(v)))


def ppl_vs_bits(rows: list[dict], out: str):
    """``rows``: quality rows (:class:`loaq.bench.QualityRow`: ``method, bits, ppl`` and optionally ``group``,
    ``rotate``, ``init``, ``act_bits``): one panel per setting (no transform, Hadamard, NeUQI, W4A4, ...), in
    each one line per method and grid (``g64`` dashed), a method's colour the same in every panel; log y.
    fp rows (bits >= 16) are a dotted horizontal line in every panel."""
    plt = _plt()
    rows = [normalized(r) for r in rows]
    fp = [r for r in rows if r["bits"] >= 16]
    settings = sorted({_setting(r) for r in rows if r["bits"] < 16})
    ncols = min(3, len(settings))
    nrows = -(-len(settings) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 1.8, 3.4 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(settings):]:
        fig.delaxes(ax)
    for ax, setting in zip(axes.flat, settings):
        got = [r for r in rows if r["bits"] < 16 and _setting(r) == setting]
        lines = dict.fromkeys((r["method"], r.get("group") or 0) for r in got)
        for method, group in sorted(lines, key=lambda t: (METHOD_NAMES.index(t[0]), t[1])):
            pts = sorted((r["bits"], r["ppl"]) for r in got if (r["method"], r.get("group") or 0) == (method, group))
            ax.plot([b for b, _ in pts], [p for _, p in pts], marker="s" if group else "o", ls="--" if group else "-",
                    color=f"C{METHOD_NAMES.index(method)}", label=method + (f" g{group}" if group else ""))
        for r in fp:
            ax.axhline(r["ppl"], color="k", ls=":", lw=1, label=f"{r['method']} ({r['ppl']:.2f})")
        bits = sorted({r["bits"] for r in got})
        ax.set(yscale="log", xlabel="weight bits", title=_setting_title(setting, bits))
        ax.set_xticks(bits)
        ax.grid(alpha=0.3)
        _plain_log_ticks(ax)
    for ax in axes[:, 0]:
        ax.set_ylabel("perplexity (ppl16k)")
    handles = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    order = sorted(handles, key=lambda k: (k.split()[0] == FP, k.split()[0] != FP and METHOD_NAMES.index(k.split()[0]), k))
    fig.legend([handles[k] for k in order], order, loc="outside right upper", fontsize=8)
    fig.suptitle("Perplexity vs weight bits, per setting")
    return _save(fig, out)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (size, ppl) points no other point beats on both, by increasing size."""
    front, best = [], float("inf")
    for size, ppl in sorted(points):
        if ppl < best:
            front.append((size, ppl))
            best = ppl
    return front


def size_vs_ppl(rows: list[dict], out: str):
    """``rows``: ``{label, disk_bytes, ppl}`` per exported variant; scatter plus the Pareto front (labelled)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [(r["disk_bytes"] / 2**20, r["ppl"]) for r in rows]
    ax.scatter([s for s, _ in pts], [p for _, p in pts], zorder=3)
    front = pareto(pts)
    for r, (s, p) in zip(rows, pts):  # name the front's points only: the others crowd at equal sizes
        if (s, p) in front:
            ax.annotate(r["label"], (s, p), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([s for s, _ in front], [p for _, p in front], color="C1", label="Pareto front")
    ax.set(yscale="log", xlabel="size on disk (MiB)", ylabel="perplexity (ppl16k)", title="Size vs perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def mixed_size_ppl(rows: list[dict], out: str):
    """``rows`` of benchmarks/mixed.py (``kind``, ``method``, ``size_mb``, ``ppl``, ``bits``/``budget_bits``): the
    uniform-width points and one mixed-precision curve per method, perplexity against size on disk."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["size_mb"])
    ax.scatter([r["size_mb"] for r in uni], [r["ppl"] for r in uni], color="k", zorder=3, label="uniform LoaQ")
    for r in uni:
        ax.annotate(f"W{r['bits']}" + (f"g{r['group']}" if r.get("group") else ""), (r["size_mb"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    def curve(r):  # method, and the allocation criterion (and candidates) where rows carry one
        return f"{r['method']} ({mixed_variant(r)})" if r.get("criterion") else r["method"]

    for i, m in enumerate(sorted({curve(r) for r in rows if r["kind"] == "mixed"})):
        pts = sorted((r["size_mb"], r["ppl"], r["budget_bits"]) for r in rows if r["kind"] == "mixed" and curve(r) == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"mixed {m}")
        for s, p, b in pts:
            ax.annotate(f"{b:g}", (s, p), textcoords="offset points", xytext=(3, -10), fontsize=7, color=f"C{i}")
    ax.set(yscale="log", xlabel="size on disk (MiB)", ylabel="perplexity (ppl16k)",
           title="Mixed precision under a size budget (labels: budget bits)")
    _plain_log_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def serve_throughput(rows: list[dict], out: str):
    """``rows``: ``{label, tokens_per_s}`` per served variant; one bar each. Rows that also carry ``variant``
    and ``concurrency`` (:func:`serve_rows`) are grouped: one group per variant, one bar colour per concurrency."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if all("variant" in r and "concurrency" in r for r in rows):
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        concs = sorted({r["concurrency"] for r in rows})
        w = 0.8 / len(concs)
        for i, c in enumerate(concs):
            got = {r["variant"]: r["tokens_per_s"] for r in rows if r["concurrency"] == c}
            xs = [j for j, v in enumerate(variants) if v in got]
            ax.bar([x + (i - (len(concs) - 1) / 2) * w for x in xs], [got[variants[x]] for x in xs], w, label=f"c={c}")
        ax.set_xticks(range(len(variants)), variants)
        ax.set_ylim(0, 1.25 * max(r["tokens_per_s"] for r in rows))  # room for the legend above the bars
        ax.legend(title="concurrency", ncols=len(concs), loc="upper left", fontsize=8)
    else:
        ax.bar([r["label"] for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set(ylabel="generated tokens/s", title="Serving throughput")
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def peak_memory_vs_params(rows: list[dict], out: str):
    """``rows``: ``{params, peak_rss_mb, method, path, device}`` (``benchmarks/scale.py``); peak memory against
    parameter count, one line per (method, path, device), log-log. Unmeasured rows (None) are left out."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    rows = [r for r in rows if r.get("peak_rss_mb") is not None]
    for key in dict.fromkeys((r["method"], r["path"], r["device"]) for r in rows):
        pts = sorted((r["params"] / 1e6, r["peak_rss_mb"]) for r in rows if (r["method"], r["path"], r["device"]) == key)
        ax.plot([p for p, _ in pts], [m for _, m in pts], marker="o", label=" ".join(key))
    ax.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="peak RSS above imports (MiB)",
           title="Peak memory while quantizing")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out)


def serve_rows(doc: dict) -> list[dict]:
    """``benchmarks/serve.py``'s ``serve.json`` (``results: {variant: {runs: {concurrency: {output_throughput}}}}``)
    as ``{label, variant, concurrency, tokens_per_s}`` rows, one per variant and concurrency."""
    return [{"label": f"{name} c={c}", "variant": name, "concurrency": int(c), "tokens_per_s": r["output_throughput"]}
            for name, v in doc["results"].items() for c, r in v["runs"].items()]


def _mse_label(rec: dict) -> str:
    """``gptq W3``, ``loaq W3 +Hadamard`` for a ``loaq eval --mse`` record."""
    return f"{rec['method']} W{rec['bits']}{' +Hadamard' if rec.get('hadamard') else ''}"


def plot_files(paths: list[str]) -> list[str]:
    """Draw every picture the given result JSONs hold; the PNG paths written.

    Recognised: ``loaq eval --mse --json`` records (all of them go into one ``layer_mse.png`` next to the
    first) or a file with ``layer_mse: {label: {mse, mse_normed}}``; a file with ``rows`` of ``ppl`` and
    ``bits`` (perplexity vs bits), of ``disk_bytes`` and ``ppl`` (size vs perplexity) or of
    ``tokens_per_s`` (serving), or ``benchmarks/serve.py``'s ``serve.json``.
    """
    written, mse, mse_first = [], {}, None
    for path in paths:
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            raise LoaQError(f"cannot read results {path!r} ({exc}); pass JSON files written by loaq or benchmarks/") from None
        stem = os.path.splitext(path)[0]
        found = False
        if "mse" in doc and "mse_normed" in doc:
            label = _mse_label(doc)
            mse[label if label not in mse else f"{label} ({os.path.basename(path)})"] = doc
            mse_first, found = mse_first or path, True
        if "layer_mse" in doc:
            mse |= doc["layer_mse"]
            mse_first, found = mse_first or path, True
        rows = doc.get("rows") or (doc.get("extended") or {}).get("rows") or []  # quality.py --tables: extended
        if isinstance(doc.get("results"), dict) and all("runs" in v for v in doc["results"].values()):
            rows = serve_rows(doc)
        if rows and all("ppl" in r and "bits" in r for r in rows):
            written.append(stem + ".ppl_bits.png")
            ppl_vs_bits(rows, written[-1])
            found = True
        if rows and all("disk_bytes" in r and "ppl" in r for r in rows):
            written.append(stem + ".size_ppl.png")
            size_vs_ppl(rows, written[-1])
            found = True
        if rows and all("peak_rss_mb" in r and "params" in r for r in rows):
            written.append(stem + ".peak_rss.png")
            peak_memory_vs_params(rows, written[-1])
            found = True
        if rows and all("tokens_per_s" in r for r in rows):
            written.append(stem + ".serve.png")
            serve_throughput(rows, written[-1])
            found = True
        if not found:
            raise LoaQError(f"{path!r} holds nothing to plot (no mse/mse_normed, layer_mse, serve results or rows "
                            f"with ppl, disk_bytes or tokens_per_s); pass a loaq or benchmarks/ results JSON")
    if mse:
        written.append(os.path.join(os.path.dirname(mse_first), "layer_mse.png"))
        layer_mse(mse, written[-1])
    _plt().close("all")
    return written
