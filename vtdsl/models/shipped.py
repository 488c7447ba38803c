"""Where trained weights ship inside the package: the vtbench models (`vtbench.py`).

Kept apart from `vtbench` so the registry can mark a built-in spec as pretrained without
importing the module that registers specs through it.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
VTBENCH = "tiny-llava-vtbench"
# vtbench v2's model (issue 22): a built-in config (`builtins.TINY_LLAVA_VTBENCH2`) whose
# trained weights ship here; `eval`, `show` and the search's accuracy objective default to it.
VTBENCH2 = "tiny-llava-vtbench2"
SHIPPED_DIRS = {VTBENCH: DATA / VTBENCH, VTBENCH2: DATA / VTBENCH2}


def trained_dir(name: str) -> Path | None:
    """The package directory holding `name`'s trained weights, or None (not a shipped
    model, or a source checkout without the files)."""
    path = SHIPPED_DIRS.get(name)
    return path if path is not None and (path / "config.json").is_file() else None
