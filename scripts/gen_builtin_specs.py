#!/usr/bin/env python
"""Regenerate vtdsl/models/data/builtin_specs.json: every built-in model's `ModelSpec`,
made by `spec_from_config` from its transformers config (vtdsl/models/builtins.py).

    python scripts/gen_builtin_specs.py [--check]

`vtdsl check` on a built-in model reads this file instead of building a transformers
config, so it never imports torch or transformers (a cold `check` in well under a
second). `--check` exits 1 when the file is out of date (tests/test_cold_start.py runs
the same comparison).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vtdsl.models.builtins import BUILTINS, SHIPPED_SPECS, builtin_config_dict, spec_to_json, specs_text  # noqa: E402
from vtdsl.models.registry import spec_from_config  # noqa: E402


def generate() -> str:
    """The file's text, from the transformers configs."""
    specs = {}
    for name, (_, description) in BUILTINS.items():
        spec = spec_from_config(builtin_config_dict(name), name=name, description=description)
        specs[name] = spec_to_json(spec)
    return specs_text(specs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped file is out of date")
    args = parser.parse_args()
    text = generate()
    if args.check:
        current = SHIPPED_SPECS.read_text(encoding="utf-8") if SHIPPED_SPECS.exists() else ""
        if current != text:
            print(f"{SHIPPED_SPECS.relative_to(ROOT)} is out of date: run python scripts/gen_builtin_specs.py")
            return 1
        return 0
    SHIPPED_SPECS.write_text(text, encoding="utf-8")
    print(f"wrote {SHIPPED_SPECS.relative_to(ROOT)} ({len(BUILTINS)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
