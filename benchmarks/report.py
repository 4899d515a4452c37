"""The three outputs of ``infergate bench``: ``results.json``, ``report.md`` and ``latency.png``.

``results.json`` is ``{"machine", "date", "command", ..., "results": [rows], "ratios": [...]}`` where
a row has the fields of DESIGN.md (``target, concurrency, rate, rps, p50_ms, p90_ms, p99_ms,
p999_ms, errors, error_codes``) and a ratio compares one target with the baseline at one level.
The markdown tables are also what BENCHMARKS.md quotes.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = "results.json"
REPORT = "report.md"
PLOT = "latency.png"


def write_all(out: Path, meta: dict, rows: list[dict], ratios: list[dict]) -> list[Path]:
    """Write the three files into ``out`` (created if missing); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    results.write_text(json.dumps({**meta, "results": rows, "ratios": ratios}, indent=2) + "\n", encoding="utf-8")
    report = out / REPORT
    report.write_text(markdown(meta, rows, ratios), encoding="utf-8")
    plot = out / PLOT
    plot_latency(rows, plot, title=f"infergate bench, {meta['date'][:10]}")
    return [results, report, plot]


def level_label(row: dict) -> str:
    label = f"c={row['concurrency']}"
    return f"{label} @{row['rate']:g}/s" if row["rate"] else label


def results_table(rows: list[dict]) -> str:
    lines = [
        "| target | load | requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        errors = str(r["errors"])
        if r["error_codes"]:
            errors += " (" + ", ".join(f"{code} {n}" for code, n in sorted(r["error_codes"].items())) + ")"
        lines.append(
            f"| {r['target']} | {level_label(r)} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {errors} |"
        )
    return "\n".join(lines) + "\n"


def ratios_table(ratios: list[dict]) -> str:
    lines = [
        "| target / baseline | load | requests/s ratio | p50 ratio | p99 ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in ratios:
        cells = [_fmt(r[k]) for k in ("rps_ratio", "p50_ratio", "p99_ratio")]
        lines.append(f"| {r['target']} / {r['baseline']} | {level_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(meta: dict, rows: list[dict], ratios: list[dict]) -> str:
    parts = [
        "# infergate bench\n",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- source: {meta.get('revision') or 'unknown'}",
        f"- each target and level: {meta['warmup_s']:g} s warm-up, then {meta['duration_s']:g} s measured; "
        "targets interleaved within each level"
        + (
            f"; {meta['rounds']} rounds with the target order rotated, each cell the median over rounds "
            "and each ratio the median of the ratios taken within one round\n"
            if meta.get("rounds", 1) > 1
            else "\n"
        ),
        "## Results\n",
        results_table(rows),
    ]
    if ratios:
        parts += [
            "## Ratios to the baseline (same run, same level)\n",
            "requests/s ratio below 1 and latency ratios above 1 mean slower than the baseline.\n",
            ratios_table(ratios),
        ]
    parts.append(f"![requests/s and p99 latency per target and load]({PLOT})\n")
    return "\n".join(parts)


def plot_latency(rows: list[dict], path: Path, title: str = "infergate bench") -> None:
    """Two panels of grouped bars: requests/s and p99 latency, one group per load level, one bar per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets = list(dict.fromkeys(r["target"] for r in rows))
    levels = list(dict.fromkeys((r["concurrency"], r["rate"]) for r in rows))
    by_key = {(r["target"], r["concurrency"], r["rate"]): r for r in rows}
    x = np.arange(len(levels))
    width = 0.8 / max(len(targets), 1)
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, field, label, fmt in (
        (ax_rps, "rps", "requests/s (higher is better)", "{:.0f}"),
        (ax_p99, "p99_ms", "p99 latency, ms (lower is better)", "{:.1f}"),
    ):
        for i, target in enumerate(targets):
            values = [by_key.get((target, c, r), {}).get(field, 0.0) for c, r in levels]
            bars = ax.bar(x + (i - (len(targets) - 1) / 2) * width, values, width, label=target)
            ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8, padding=2)
        ax.set_xticks(x, [level_label({"concurrency": c, "rate": r}) for c, r in levels])
        ax.set_xlabel("load level (concurrent callers)")
        ax.set_title(label)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    ax_rps.legend(loc="upper left", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
