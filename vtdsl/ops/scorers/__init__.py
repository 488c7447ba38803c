"""The scorer catalogue: one module per scorer family, each declaring its `ScorerInfo`
entries (arguments, properties, cost, kernel) and holding its kernels.

Every module of this package but `base` (and names starting with ``_``) is imported here,
so a new scorer is one new file (docs/dev/contracts.md, "Scores"). No module imports
torch at import time: `vtdsl parse` reads the same entries.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import SCORERS, ScoreContext, ScorerInfo, ScoreSize, by_canonical, no_cost, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SCORERS", "ScoreContext", "ScoreSize", "ScorerInfo", "by_canonical", "no_cost", "register"]
