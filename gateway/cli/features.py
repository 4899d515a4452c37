"""``infergate features load VIEW FILE``: bulk-load a feature view into Redis.

CSV with a header row: the entity id in the first column, then the view's ``dim`` values in order
(or Parquet with the same columns, when pyarrow is installed). Rows are written with pipelined
commands in chunks.
"""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path
from typing import Optional

import typer

from infergate.gateway.cli.common import load_config_or_exit, require_extra

commands = typer.Typer()
features_app = typer.Typer(no_args_is_help=True, help="Online feature views in Redis.")
commands.add_typer(features_app, name="features")


def read_rows(path: Path, dim: int) -> list[tuple[str, list[float]]]:
    """``(entity id, values)`` rows of a CSV or Parquet file; ValueError names the bad line."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError("reading Parquet needs pyarrow: pip install 'infergate[parquet]'") from exc
        table = pq.read_table(path).to_pylist()
        records = [list(row.values()) for row in table]
        start_line = 1
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file")
            records = list(reader)
        start_line = 2
    rows = []
    for line, record in enumerate(records, start=start_line):
        if len(record) != dim + 1:
            raise ValueError(f"{path}:{line}: {len(record) - 1} values, the view has dim {dim}")
        try:
            rows.append((str(record[0]), [float(v) for v in record[1:]]))
        except ValueError as exc:
            raise ValueError(f"{path}:{line}: {exc}") from exc
    return rows


@features_app.command("load")
def load(
    view: str = typer.Argument(..., help="Feature view name from the config."),
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CSV (header row) or Parquet file."),
    config: Path = typer.Option(..., "--config", "-c", help="Gateway config that defines the view."),
    redis_url: Optional[str] = typer.Option(None, help="Redis URL (default: redis.url from the config)."),
) -> None:
    """Write every row of FILE to Redis under the view's key template."""
    import redis.asyncio as aioredis

    from infergate.gateway.features import write_rows

    if file.suffix == ".parquet":
        require_extra("pyarrow", "parquet", "reading Parquet")
    gateway_config = load_config_or_exit(config)
    view_config = gateway_config.feature_views.get(view)
    if view_config is None:
        typer.echo(f"infergate: unknown feature view {view!r}; the config has {sorted(gateway_config.feature_views)}", err=True)
        raise typer.Exit(2)
    url = redis_url or gateway_config.redis.url
    if not url:
        typer.echo("infergate: no Redis URL (redis.url in the config, or --redis-url)", err=True)
        raise typer.Exit(2)
    try:
        rows = read_rows(file, view_config.dim)
    except (ValueError, OSError) as exc:
        typer.echo(f"infergate: {exc}", err=True)
        raise typer.Exit(2) from None

    async def write() -> int:
        client = aioredis.Redis.from_url(url)
        try:
            return await write_rows(client, view_config, rows)
        finally:
            await client.aclose()

    try:
        count = asyncio.run(write())
    except Exception as exc:  # redis errors: one line, no traceback
        typer.echo(f"infergate: writing to Redis failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"loaded {count} row(s) into view {view}")
