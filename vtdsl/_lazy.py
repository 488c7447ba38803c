"""Package attributes imported on first use (PEP 562), so that importing a package costs
only what its caller touches (`vtdsl parse` never imports torch)."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_attributes(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """A module `__getattr__` and `__all__` for `package`: `exports` maps each module to the
    names it provides."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in home:
            return getattr(import_module(home[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(home)
