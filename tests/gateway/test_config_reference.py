"""The README's configuration reference is generated from the config models and cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from infergate.gateway.config import GatewayConfig
from infergate.gateway.config_doc import END, START, reference_markdown, undocumented_fields

ROOT = Path(__file__).resolve().parents[2]


def test_every_field_has_a_docstring():
    assert undocumented_fields() == []


def test_the_reference_names_every_section_and_field_with_its_docstring():
    text = reference_markdown()
    for section in ("server", "server.tls", "auth", "redis", "telemetry", "backends.NAME (kind: triton)",
                    "backends.NAME (kind: onnx)", "backends.NAME.breaker", "feature_views.NAME", "models.NAME",
                    "models.NAME.batching", "models.NAME.variants.NAME", "models.NAME.canary"):
        assert f"#### `{section}`" in text, section
    listen = GatewayConfig.model_fields["server"].annotation.model_fields["listen"]
    assert f"| `listen` | string | `0.0.0.0:8001` | {listen.description} |" in text
    assert "| `max_delay_us` | int | `1000` |" in text


def test_the_readme_holds_the_generated_reference():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert START in readme and END in readme
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
