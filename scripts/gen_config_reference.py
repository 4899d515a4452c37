#!/usr/bin/env python3
"""Write the configuration reference into README.md, from the config models' field docstrings.

    python scripts/gen_config_reference.py          # rewrite the README between the markers
    python scripts/gen_config_reference.py --check  # exit 1 when the README is stale (tests run this check)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def updated(text: str) -> str:
    from infergate.gateway.config_doc import END, START, reference_markdown

    before, start, rest = text.partition(START)
    _old, end, after = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"{README}: the markers {START!r} and {END!r} are missing")
    return f"{before}{START}\n\n{reference_markdown()}\n{END}{after}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale, write nothing")
    args = parser.parse_args()
    text = README.read_text(encoding="utf-8")
    new = updated(text)
    if args.check:
        if new != text:
            print("README.md: the configuration reference is stale; run python scripts/gen_config_reference.py")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
