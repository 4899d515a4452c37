"""The three outputs of ``infergate bench``: ``results.json``, ``report.md`` and ``latency.png``.

``results.json`` is ``{"machine", "date", "command", ..., "results": [rows], "ratios": [...]}`` where
a row has the documented fields (``target, concurrency, rate, rps, p50_ms, p90_ms, p99_ms,
p999_ms, errors, error_codes``), the server's CPU per call (``server_cpu_ms_per_call``, null when
its process is unknown), how busy the busiest load process was (``load_cpu_busy``), the host's
1-minute load average after the run, and with several rounds each round's figures
(``rps_by_round``...). A ratio compares one target with the baseline at one level. The markdown
tables are also what BENCHMARKS.md quotes. The plot draws lines over concurrency: requests/s, and
p50 (solid) and p99 (dashed) latency, with the spread across rounds shaded.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = "results.json"
REPORT = "report.md"
PLOT = "latency.png"


def write_all(out: Path, meta: dict, rows: list[dict], ratios: list[dict], plot: bool = True) -> list[Path]:
    """Write the files into ``out`` (created if missing): results and report, and the plot unless
    ``plot`` is false; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    results.write_text(json.dumps({**meta, "results": rows, "ratios": ratios}, indent=2) + "\n", encoding="utf-8")
    report = out / REPORT
    report.write_text(markdown(meta, rows, ratios, plot), encoding="utf-8")
    if not plot:
        return [results, report]
    image = out / PLOT
    plot_latency(rows, image, title=f"infergate bench, {meta['date'][:10]}")
    return [results, report, image]


def level_label(row: dict) -> str:
    label = f"c={row['concurrency']}"
    return f"{label} @{row['rate']:g}/s" if row["rate"] else label


def results_table(rows: list[dict]) -> str:
    lines = [
        "| target | load | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | server CPU ms/call | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        errors = str(r["errors"])
        if r["error_codes"]:
            errors += " (" + ", ".join(f"{code} {n}" for code, n in sorted(r["error_codes"].items())) + ")"
        cpu = r.get("server_cpu_ms_per_call")
        lines.append(
            f"| {r['target']} | {level_label(r)} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {'n/a' if cpu is None else f'{cpu:.3f}'} | {errors} |"
        )
    return "\n".join(lines) + "\n"


def spread_table(rows: list[dict]) -> str:
    """Each round's requests/s, and the spread (max - min) / median: how far one round can be trusted."""
    lines = ["| target | load | requests/s by round | spread |", "| --- | --- | --- | ---: |"]
    for r in rows:
        values = r.get("rps_by_round") or []
        spread = (max(values) - min(values)) / r["rps"] if r["rps"] and values else None
        lines.append(
            f"| {r['target']} | {level_label(r)} | {', '.join(f'{v:.0f}' for v in values)} | "
            f"{'n/a' if spread is None else f'{spread:.1%}'} |"
        )
    return "\n".join(lines) + "\n"


def targets_list(meta: dict) -> str:
    lines = []
    for t in meta.get("targets", []):
        where = f" CPUs allowed: {t['cpus_allowed']}." if t.get("cpus_allowed") else ""
        cpu = "" if t.get("pid") else " (process unknown: no CPU time)"
        lines.append(f"- `{t['name']}` ({t['url']}): {t['description'] or 'no description'}.{where}{cpu}")
    return "\n".join(lines) + "\n"


def ratios_table(ratios: list[dict]) -> str:
    lines = [
        "| target / baseline | load | requests/s ratio | p50 ratio | p99 ratio | CPU/call ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in ratios:
        cells = [_fmt(r.get(k)) for k in ("rps_ratio", "p50_ratio", "p99_ratio", "cpu_per_call_ratio")]
        lines.append(f"| {r['target']} / {r['baseline']} | {level_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(meta: dict, rows: list[dict], ratios: list[dict], plot: bool = True) -> str:
    loads = [v for v in [meta.get("loadavg_1m_start")] + [r.get("loadavg_1m") for r in rows] + [meta.get("loadavg_1m_end")]
             if v is not None]
    load = meta.get("load", {})
    parts = [
        "# infergate bench\n",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- source: {meta.get('revision') or 'unknown'}",
        f"- CPUs: {meta.get('pinning', 'not recorded')}",
        f"- load generator: {load.get('mode', 'tritonclient')}, {load.get('processes', 1)} process(es)",
        "- host load average (1 min) during the run: "
        + (f"{min(loads):.2f} to {max(loads):.2f}" if loads else "not available"),
        f"- each target and level: {meta['warmup_s']:g} s warm-up, then {meta['duration_s']:g} s measured; "
        "targets interleaved within each level; failed calls counted as errors and kept out of the latency figures"
        + (
            f"; {meta['rounds']} rounds with the target order rotated, each cell the median over rounds "
            "and each ratio the median of the ratios taken within one round\n"
            if meta.get("rounds", 1) > 1
            else "\n"
        ),
    ]
    if meta.get("targets"):
        parts += ["## Targets\n", targets_list(meta)]
    parts += ["## Results\n", results_table(rows)]
    if meta.get("rounds", 1) > 1:
        parts += ["## Spread across rounds\n", spread_table(rows)]
    busy = [r for r in rows if (r.get("load_cpu_busy") or 0) > 0.9]
    if busy:
        parts.append(
            "**Warning:** a load process was over 90 % busy in "
            + ", ".join(f"{r['target']} {level_label(r)}" for r in busy)
            + ": those figures may be the load generator's limit.\n"
        )
    if ratios:
        parts += [
            f"## Ratios to the baseline (same run, same level)\n",
            "requests/s ratio below 1 and latency or CPU ratios above 1 mean slower or costlier than the reference.\n",
            ratios_table(ratios),
        ]
    if plot:
        parts.append(f"![requests/s and p50/p99 latency per target over concurrency]({PLOT})\n")
    return "\n".join(parts)


def plot_latency(rows: list[dict], path: Path, title: str = "infergate bench") -> None:
    """Two panels of lines over concurrency, one line per target (and rate): requests/s, and p50
    (solid) and p99 (dashed) latency; the range across rounds is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        series.setdefault((row["target"], row["rate"]), []).append(row)
    rates = {rate for _, rate in series}
    concurrencies = sorted({r["concurrency"] for r in rows})
    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (target, rate), points in series.items():
        points.sort(key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in points]
        label = target if len(rates) == 1 else f"{target} @{rate:g}/s" if rate else f"{target} closed loop"
        (line,) = ax_rps.plot(x, [r["rps"] for r in points], marker="o", label=label)
        _band(ax_rps, x, points, "rps_by_round", line.get_color())
        ax_lat.plot(x, [r["p50_ms"] for r in points], marker="o", color=line.get_color(), label=f"{label} p50")
        ax_lat.plot(x, [r["p99_ms"] for r in points], marker="^", linestyle="--", color=line.get_color(), label=f"{label} p99")
        _band(ax_lat, x, points, "p50_ms_by_round", line.get_color())
        _band(ax_lat, x, points, "p99_ms_by_round", line.get_color())
    for ax, label in ((ax_rps, "requests/s (higher is better)"), (ax_lat, "latency, ms: p50 solid, p99 dashed (lower is better)")):
        if len(concurrencies) > 1 and concurrencies[-1] / concurrencies[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrent callers")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_rps.legend(loc="best", fontsize=8)
    ax_lat.legend(loc="best", fontsize=7, ncol=2)
    fig.suptitle(title + ("; shaded: range across rounds" if any(len(r.get("rps_by_round") or []) > 1 for r in rows) else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _band(ax, x: list[int], points: list[dict], field: str, color: str) -> None:
    """Shade between the lowest and highest round at each concurrency (nothing with one round)."""
    by_round = [p.get(field) or [] for p in points]
    if not all(len(values) > 1 for values in by_round):
        return
    ax.fill_between(x, [min(v) for v in by_round], [max(v) for v in by_round], color=color, alpha=0.15, linewidth=0)
