"""Medians, spreads, ratio tables, the Markdown report and the plot."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Optional

from .common import METRICS, TABLES, Metric
from .measure import noisy


def summarize(runs: Dict[str, List[dict]]) -> Dict[str, Dict[str, dict]]:
    summary: Dict[str, Dict[str, dict]] = {}
    for name, reps in runs.items():
        summary[name] = {}
        # A rep still spoiled by other load after the make-ups counts only
        # when no clean rep has the figure.
        clean = [r for r in reps if not noisy(r)]
        for m in METRICS:
            vals = [r["metrics"][m.key] for r in clean if r["metrics"].get(m.key) is not None]
            if not vals:
                vals = [r["metrics"][m.key] for r in reps if r["metrics"].get(m.key) is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            spread = 100 * (max(vals) - min(vals)) / med if med else None
            summary[name][m.key] = {"median": med, "spread_pct": spread, "n": len(vals),
                                    "min": min(vals), "max": max(vals)}
    return summary


def fmt(v: Optional[float], digits: int) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def median(summary: dict, name: str, key: str) -> Optional[float]:
    return summary[name].get(key, {}).get("median")


def cell(summary: dict, name: str, m: Metric) -> str:
    v = median(summary, name, m.key)
    if m.of and v is not None:
        return f"{fmt(v, m.digits)}/{fmt(median(summary, name, m.of), m.digits)}"
    return fmt(v, m.digits)


def table_metrics(table: str) -> List[Metric]:
    return [m for m in METRICS if m.table == table]


def absolute_table(summary: dict, names: List[str], metrics: List[Metric]) -> str:
    rows = [[n] + [cell(summary, n, m) for m in metrics] for n in names]
    return md_table(["contender"] + [m.header for m in metrics], rows)


def spread_table(summary: dict, names: List[str], metrics: List[Metric]) -> str:
    # direct's CPU figures are idle noise; their relative spread means nothing.
    metrics = [m for m in metrics if not m.of]
    rows = [[n] + [fmt(None if m.cpu and n == "direct" else
                       summary[n].get(m.key, {}).get("spread_pct"), 0) for m in metrics]
            for n in names]
    return md_table(["spread %"] + [m.header for m in metrics], rows)


def ratio_table(summary: dict, names: List[str], ref: str, metrics: List[Metric]) -> str:
    rows = []
    for n in names:
        row = [n]
        for m in metrics:
            v, r = median(summary, n, m.key), median(summary, ref, m.key)
            meaningless = m.cpu and n == "direct"  # it has no proxy to cost anything
            row.append(f"{v / r:.2f}×" if v is not None and r and not meaningless else "—")
        if any(c != "—" for c in row[1:]):
            rows.append(row)
    return md_table([f"÷ {ref}"] + [m.header for m in metrics], rows)


def saturation_table(result: dict, names: List[str]) -> Optional[str]:
    """Median CPU % of the proxy's and of the load's CPUs during bulk tests:
    when the load side is at ~100 % and the proxy is not, the figure is a
    lower bound of what the proxy can do."""
    rows = []
    for n in names:
        row = [n]
        for test in ("bulk1", "bulk8"):
            for key in ("proxy_cpu_pct", "load_cpu_pct"):
                vals = [rep["notes"].get("bulk", {}).get(test, {}).get(key)
                        for rep in result["runs"][n]]
                vals = [v for v in vals if v is not None]
                row.append(fmt(statistics.median(vals), 0) if vals else "—")
        rows.append(row)
    if all(c == "—" for r in rows for c in r[1:]):
        return None
    return md_table(["bulk CPU %", "1 stream: proxy", "1 stream: load",
                     "8 streams: proxy", "8 streams: load"], rows)


def _bulk_median(result: dict, name: str, test: str, pick) -> Optional[float]:
    vals = []
    for rep in result["runs"][name]:
        note = rep["notes"].get("bulk", {}).get(test, {})
        try:
            v = pick(note)
        except (KeyError, TypeError, ZeroDivisionError):
            v = None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def _server_leg(note: dict) -> dict:
    legs = note["tcp"]["legs"]
    return legs.get("proxy_server") or legs["client_server"]


TCP_COLUMNS = [
    ("retrans/GB", 0, lambda n: n["tcp"]["retrans_per_gb"]),
    ("ofo/GB", 0, lambda n: n["tcp"]["ofo_per_gb"]),
    ("ctxt/GB", 0, lambda n: n["tcp"]["ctxt_per_gb"]),
    ("proxy cs/GB", 0, lambda n: n["tcp"]["proxy_switches_per_gb"]),
    ("seg KiB", 1, lambda n: _server_leg(n)["data_seg_kib"]),
    ("usr/sys/si %", None, lambda n: n["proxy_cpu_split_pct"]),
]


def tcp_table(result: dict, names: List[str]) -> Optional[str]:
    """--tcp-stats' figures (notes.bulk.bulkN.tcp), if the run has them."""
    if not any(rep["notes"].get("bulk", {}).get("bulk1", {}).get("tcp")
               for n in names for rep in result["runs"][n]):
        return None
    rows = []
    for n in names:
        row = [n]
        for header, digits, pick in TCP_COLUMNS:
            cells = []
            for test in ("bulk1", "bulk8"):
                if digits is None:  # a dict of parts: each part's median
                    parts = [_bulk_median(result, n, test, lambda note, k=k: pick(note)[k])
                             for k in ("user", "system", "softirq")]
                    cells.append("—" if None in parts else "/".join(f"{v:.0f}" for v in parts))
                else:
                    cells.append(fmt(_bulk_median(result, n, test, pick), digits))
            row.append(" · ".join(cells))
        rows.append(row)
    return md_table(["contender"] + [h for h, _, _ in TCP_COLUMNS], rows)


def render(result: dict) -> str:
    summary, names = result["summary"], list(result["summary"])
    cfg = result["config"]
    extra = (f", {cfg['idle_count']} idle bridges in {cfg.get('idle_reps', cfg['reps'])} rep(s)"
            if cfg.get("idle_count") else "")
    extra += (f", mping {cfg['mping_conns']} connections × {cfg['mping_seconds']} s"
             if "mping" in cfg.get("tests", ()) else "")
    extra += (f", redis-benchmark -c 50 -n {cfg['redis_requests']}"
             if "redis" in cfg.get("tests", ()) else "")
    parts = [
        f"## fastproxy benchmarks — {result['started']}",
        "",
        f"pin={cfg['pin']} (proxy CPUs {cfg['proxy_cpus']}, load CPUs {cfg['load_cpus']}), "
        f"reps={cfg['reps']}, iperf3 -t {cfg['duration']}, connrate {cfg['conn_duration']} s "
        f"× {cfg['concurrency']}, {cfg['pings']} pings{extra}, workers/nbthread "
        f"{cfg['workers']}, TCP congestion control {cfg.get('congestion_control') or 'not recorded'}. "
        "Medians over reps (clean ones first); CPU = proxy CPU "
        f"({'busy time of its CPUs' if cfg['pin'] == 'split' else 'process tree utime+stime'}; "
        "1-CPU ping: on-CPU time of the proxy's threads).",
    ]
    for table, title in TABLES.items():
        metrics = [m for m in table_metrics(table)
                   if any(m.key in summary[n] for n in names)]
        if not metrics:
            continue
        parts += ["", f"### {title}", "", absolute_table(summary, names, metrics)]
        if cfg["reps"] > 1:
            parts += ["", "Spread over reps, (max−min)/median:", "",
                      spread_table(summary, names, metrics)]
        for ref in ("haproxy-splice", "haproxy", "direct"):
            ratio = [m for m in metrics if m.ratio and not (ref == "direct" and m.cpu)]
            if ref in summary and len(names) > 1 and ratio:
                parts += ["", f"Ratio to {ref} (throughput, conn/s: >1 is better; "
                              "latency, CPU, memory: <1 is better):", "",
                          ratio_table(summary, [n for n in names if n != ref], ref, ratio)]
    sat = saturation_table(result, names)
    if sat:
        parts += ["", "### Which side was saturated in the bulk tests", "", sat]
    tcp = tcp_table(result, names)
    if tcp:
        parts += ["", "### TCP during the bulk tests (--tcp-stats)", "",
                  "Per GB delivered: retransmitted segments, packets queued out of order, "
                  "context switches (machine) and the proxy's own; bytes per data segment "
                  "on the leg into the server; the proxy CPU's user / system / softirq %. "
                  "Medians over reps; 1 stream · 8 streams.", "", tcp]
    errors = [f"- {n} rep {i + 1}, {group} tests: {gn['error']}"
              for n, reps in result["runs"].items() for i, rep in enumerate(reps)
              for group, gn in rep["notes"].items() if "error" in gn]
    if errors:
        parts += ["", "Failures:", ""] + errors
    noise = [f"{n} rep {i + 1}" for n, reps in result["runs"].items()
             for i, rep in enumerate(reps) if noisy(rep)]
    if noise:
        parts += ["", "Other load on the machine spoiled " + ", ".join(noise) +
                      " (see `noise` in the JSON); medians use the other reps where "
                      "they have the figure."]
    retried = sum(rep.get("attempt", 1) - 1 for reps in result["runs"].values() for rep in reps)
    if retried:
        parts += ["", f"{retried} rep(s) spoiled by other load were run again at the end."]
    if result.get("plot"):
        parts += ["", f"Plot: {result['plot']}"]
    return "\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> Optional[str]:
    """Bulk throughput and proxy CPU-s per GB by contender, as a PNG.
    Returns why not, if it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable (pip install matplotlib): no plot"
    summary = result["summary"]
    names = [n for n in summary if "bulk1_gbps" in summary[n] or "bulk8_gbps" in summary[n]]
    if not names:
        return "no bulk figures to plot"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [(axes[0], "gbps", "Gbit/s (higher is better)", "Bulk throughput", names),
              (axes[1], "cpu_s_per_gb", "proxy CPU-s per GB (lower is better)",
               "Proxy CPU per GB forwarded", [n for n in names if n != "direct"])]
    width = 0.38
    for ax, suffix, ylabel, title, shown in panels:
        xs = range(len(shown))
        for i, streams in enumerate((1, 8)):
            key = f"bulk{streams}_{suffix}"
            meds = [median(summary, n, key) or 0 for n in shown]
            lo = [m - summary[n].get(key, {}).get("min", m) for n, m in zip(shown, meds)]
            hi = [summary[n].get(key, {}).get("max", m) - m for n, m in zip(shown, meds)]
            bars = ax.bar([x + (i - 0.5) * width for x in xs], meds, width,
                          yerr=[lo, hi], capsize=3,
                          label=f"{streams} stream{'s' if streams > 1 else ''}")
            ax.bar_label(bars, fmt="%.2f" if suffix != "gbps" else "%.1f", fontsize=7,
                         padding=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(shown, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    cfg = result["config"]
    fig.suptitle(f"fastproxy benchmarks {result['started']} — medians of {cfg['reps']} "
                 f"rep(s), bars show min–max; pin={cfg['pin']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
