"""One scrape of a gateway's Prometheus endpoint, as a dict of samples."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 30.0


def scrape(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample served at ``http://host:port/metrics``, keyed by ``(name, sorted label pairs)``."""
    page = httpx.get(f"http://{host}:{port}/metrics", timeout=SCRAPE_TIMEOUT_S).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def requests_total(samples: dict, model: str, variant: str, code: str) -> float:
    """``infergate_requests_total{model,variant,code}`` in a scrape (0 when absent)."""
    return samples.get(("infergate_requests_total", (("code", code), ("model", model), ("variant", variant))), 0.0)
