"""``infergate monitor profile MODEL DATA.csv|.parquet``: write a model's drift reference profile.

The data file has a header row naming, for each column, a tensor and a feature index:
``TENSOR:INDEX`` (``FEATURES:0``, ``FEATURES:1``...), or a bare ``TENSOR`` for index 0. The values
are those the model sees (inputs after online features were added) or gives (outputs). The profile
(JSON) holds, per tensor and index, the bucket edges (the data's quantiles) and the share of rows
in each bucket; point ``monitoring.models.<MODEL>.profile`` at it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import typer

commands = typer.Typer()
monitor_app = typer.Typer(no_args_is_help=True, help="Model monitoring: drift reference profiles.")
commands.add_typer(monitor_app, name="monitor")


def read_columns(path: Path) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    """Per tensor: its feature indexes (sorted) and values ``[rows, indexes]``; ValueError names the problem."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError("reading Parquet needs pyarrow: pip install 'infergate[parquet]'") from exc
        table = pq.read_table(path)
        header = list(table.column_names)
        data = np.column_stack([np.asarray(table.column(name).to_numpy(), dtype=np.float64) for name in header])
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}: empty file")
            rows = []
            for line, record in enumerate(reader, start=2):
                if len(record) != len(header):
                    raise ValueError(f"{path}:{line}: {len(record)} values, the header has {len(header)} columns")
                try:
                    rows.append([float(value) for value in record])
                except ValueError as exc:
                    raise ValueError(f"{path}:{line}: {exc}") from exc
        if not rows:
            raise ValueError(f"{path}: no data rows")
        data = np.asarray(rows, dtype=np.float64)
    positions: dict[str, dict[int, int]] = {}
    for column, name in enumerate(header):
        tensor, _, index = name.strip().rpartition(":") if ":" in name else (name.strip(), "", "0")
        try:
            feature = int(index)
        except ValueError:
            raise ValueError(f"{path}: column {name!r} is not TENSOR or TENSOR:INDEX") from None
        if feature in positions.setdefault(tensor, {}):
            raise ValueError(f"{path}: column {name!r} appears twice")
        positions[tensor][feature] = column
    return {
        tensor: (tuple(sorted(columns)), data[:, [columns[i] for i in sorted(columns)]])
        for tensor, columns in positions.items()
    }


@monitor_app.command("profile")
def profile(
    model: str = typer.Argument(..., help="Model name (recorded in the profile)."),
    data: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV (header TENSOR:INDEX) or Parquet file."),
    out: Path = typer.Option(..., "--out", "-o", help="Profile file to write (JSON)."),
    bins: int = typer.Option(10, min=2, max=50, help="Buckets per feature."),
) -> None:
    """Write the reference profile of MODEL from DATA, for drift monitoring."""
    from infergate.gateway.monitor import build_profile, write_profile

    try:
        columns = read_columns(data)
        result = build_profile(model, columns, bins)
        write_profile(result, out)
    except (ValueError, OSError) as exc:
        typer.echo(f"infergate: {exc}", err=True)
        raise typer.Exit(2) from None
    features = sum(len(t.indexes) for t in result.tensors.values())
    typer.echo(f"wrote {out}: model {model}, {result.rows} rows, {len(result.tensors)} tensor(s), {features} feature(s), {bins} buckets")
