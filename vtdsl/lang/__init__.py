"""The policy language front end: `.vt` and YAML text -> typed AST -> canonical text.

    from vtdsl.lang import parse, format_policy
    policy = parse("at vit.layer16 keep anchors top 10% + buffers; at llm.layer2 keep diverse 64")
    print(format_policy(policy))

Nothing here imports torch: `vtdsl parse` / `vtdsl fmt` stay fast.
"""

from .ast import Policy
from .errors import Diagnostic, PolicyError, did_you_mean
from .format import format_policy, format_source
from .parser import MAX_SOURCE_BYTES, parse
from .scorers import COMBINERS, MAX_SCORE_DEPTH, SCORERS, SELECTORS, ScorerInfo
from .source import parse_file, parse_text
from .yaml_form import from_yaml, to_yaml

__all__ = [
    "COMBINERS",
    "Diagnostic",
    "MAX_SCORE_DEPTH",
    "MAX_SOURCE_BYTES",
    "Policy",
    "PolicyError",
    "SCORERS",
    "SELECTORS",
    "ScorerInfo",
    "did_you_mean",
    "format_policy",
    "format_source",
    "from_yaml",
    "parse",
    "parse_file",
    "parse_text",
    "to_yaml",
]
