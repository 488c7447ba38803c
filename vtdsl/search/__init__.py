"""Automated budget search over policy spaces.

- `vtdsl.search.space`: the space language (a policy with holes), counting, sampling,
  enumeration, instantiation into canonical policies.
- `vtdsl.search.objectives`: what a candidate is scored by (agreement, accuracy, ...).
- `vtdsl.search.run`: the optuna-driven search with cost-model pre-filtering, SQLite
  storage, resumption and local worker processes; `vtdsl.search.report` its outputs.

    from vtdsl.search import load_space
    space = load_space("examples/design.vts")
    space.count, space.sample(3, seed=0)
"""

from .space import Candidate, Space, load_space, parse_space

__all__ = ["Candidate", "Space", "load_space", "parse_space"]
