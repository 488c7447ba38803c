"""English words for the grammar's terminals, for `expected: ...` lines in errors.

Every terminal in grammar.lark has an entry in `TERMINAL_WORDS`; a test checks that no
terminal is missing, so a raw name like `__ANON_3` or `_KEEP` can never reach a user.
`expected_phrase` turns the set of terminals a parser state accepts into one line,
collapsing families ("an action: keep, merge, pool or drop").
"""

from __future__ import annotations

from .scorers import COMBINERS, SCORERS

_SCORER_LIST = ", ".join(SCORERS)

# Terminal name -> the words used when that terminal is expected.
TERMINAL_WORDS: dict[str, str] = {
    "_POLICY": "'policy'",
    "_MODEL": "'model'",
    "_BUDGET": "'budget'",
    "FLOPS": "'flops'",
    "FLOPS_FASTV": "'flops_fastv'",
    "TOKENS": "'tokens'",
    "KV": "'kv'",
    "LATENCY": "'latency'",
    "DECODE_LATENCY": "'decode_latency'",
    "LE": "'<='",
    "LT": "'<'",
    "_AT": "'at'",
    "_DURING": "'during'",
    "_DECODE": "'decode'",
    "_ATTEND": "'attend' and top K",
    "_EVERY": "'every'",
    "_LAYER": "'layer'",
    "_LAYERS": "'layers'",
    "_FROM": "'from' and a site",
    "_TO": "'to' and a site",
    "_KEEP": "'keep'",
    "_MERGE": "'merge'",
    "_POOL": "'pool'",
    "_DROP": "'drop'",
    "_TOP": "'top'",
    "_HEADS": "'heads'",
    "_BY": "'by' (outliers, lof(K), or entropy(score) over N layers)",
    "OUTLIERS": "'outliers'",
    "LOF": "'lof' and a neighbour count in parentheses",
    "_ENTROPY": "'entropy' and a score in parentheses",
    "_OVER": "'over' and a number of layers",
    "DIVERSE": "'diverse'",
    "UNIFORM": "'uniform'",
    "UNIQUE": "'unique'",
    "RANDOM": "'random'",
    "FAR": "'far'",
    "_WITH": "'with' (N text pivots by a score)",
    "_PIVOTS": "'pivots'",
    "_PLUS": "'+' and another term",
    "_SEED": "'seed'",
    "_BUFFERS": "'buffers'",
    "CLS_TOKEN": "'cls_token'",
    "_PER": "'per' (crop, frame, region RxC, chunk N, window N or segment C)",
    "CROP": "'crop'",
    "REGION": "'region'",
    "CHUNK": "'chunk'",
    "FRAME": "'frame'",
    "WINDOW": "'window' and a number of frames",
    "SEGMENT": "'segment' and a number of segments",
    # what may follow 'then' and the options' keywords come from vtdsl/ops/rest (add_rest_words)
    "_THEN": "'then' and what happens to the rest",
    "_REST": "'rest'",
    "_INTO": "'into'",
    "PROPORTIONAL": "'proportional'",
    "SOFTMAX": "'softmax' and a temperature such as 0.01",
    "RENUMBER": "'renumber'",
    "ALL": "'all'",
    "MEAN": "'mean'",
    "SUM": "'sum'",
    "MAX": "'max'",
    "PROD": "'prod'",
    "SHARE": "'share'",
    "EMA": "'ema'",
    "_STAR": "'*' and a score",
    "_COMMA": "','",
    "_LPAR": "'('",
    "_RPAR": "')'",
    "_AT_SIGN": "'@' and a site",
    "_SEMI": "';'",
    "_NL": "a new line",
    "SITE": "a site such as vit.layer16, vit.out or llm.layer2",
    "SITE_RANGE": "a layer range such as vit.layer8..22",
    "NAME": f"a scorer ({_SCORER_LIST})",
    "PERCENT": "a percentage such as 10%",
    "GRID": "a grid size such as 2x2",
    "NUMBER": "a number",
    "STRING": 'a quoted string such as "llava-1.5-7b"',
    "COMMENT": "a comment",
    "WS": "a space",
    "$END": "the end of the statement (';' or a new line)",  # see END_OF_STATEMENT
}

# Families of terminals that read better as one phrase. Checked in order; a family is
# used when all of its members are expected, and then replaces them.
_FAMILIES: list[tuple[frozenset[str], str]] = [
    (
        frozenset({"NAME", "MEAN", "SUM", "MAX", "PROD", "SHARE", "DIVERSE", "UNIFORM", "UNIQUE", "RANDOM", "FAR",
                   "_BUFFERS", "CLS_TOKEN"}),
        "a term: a score with 'top' (cls top 10%), a selector (diverse, uniform, unique, "
        "random, far), buffers or cls_token",
    ),
    (frozenset({"NAME", "MEAN", "SUM", "MAX", "PROD", "SHARE", "NUMBER"}),
     f"a score: a scorer ({_SCORER_LIST}) or {', '.join(COMBINERS)}(...), optionally weighted (0.5 * cls)"),
    (frozenset({"NAME", "MEAN", "SUM", "MAX", "PROD", "SHARE"}), f"a score: a scorer ({_SCORER_LIST}) or {', '.join(COMBINERS)}(...)"),
    (frozenset({"NAME", "ALL"}), "an argument such as last or all"),
    (frozenset({"_KEEP", "_MERGE", "_POOL", "_DROP"}), "an action: keep, merge, pool or drop"),
    (
        frozenset({"_AT", "_EVERY", "_DURING", "_POLICY", "_MODEL", "_BUDGET"}),
        "a stage (at <site> ..., every N layers from <site> to <site> ... or during decode at <site> ...) "
        "or a header line (policy, model, budget)",
    ),
    (frozenset({"FLOPS", "FLOPS_FASTV", "TOKENS", "KV", "LATENCY", "DECODE_LATENCY"}),
     "a budget metric: flops, flops_fastv, tokens, kv, latency or decode_latency"),
    (frozenset({"LE", "LT"}), "'<=' or '<'"),
    (frozenset({"NUMBER", "PERCENT", "_LPAR"}),
     "a token count such as 64 or a percentage such as 10% (after diverse: or '(sum)')"),
    (frozenset({"NUMBER", "PERCENT"}), "a token count such as 64 or a percentage such as 10%"),
    (frozenset({"CROP", "FRAME", "REGION", "CHUNK", "WINDOW", "SEGMENT"}),
     "'crop', 'frame', 'region RxC', 'chunk N', 'window N' or 'segment C'"),
    (frozenset({"_COMMA", "_RPAR"}), "',' or ')'"),
    (frozenset({"SUM", "NAME"}), "'sum' (diverse(sum)) or 'norm' (far(norm))"),
]


END_OF_STATEMENT = "the end of the statement (';' or a new line)"


def expected_phrase(terminals: set[str] | frozenset[str], *, end: str = END_OF_STATEMENT) -> str:
    """One English line for the terminals a parser state accepts; `end` names $END."""
    left = set(terminals)
    parts: list[str] = []
    for members, words in _FAMILIES:
        if members <= left:
            parts.append(words)
            left -= members
    # Keywords first (in grammar order), then value terminals, then the end.
    order = list(TERMINAL_WORDS)
    for name in sorted(left, key=lambda n: order.index(n) if n in order else len(order)):
        parts.append(end if name == "$END" else TERMINAL_WORDS.get(name, name.strip("_").lower()))
    return join_or(parts)


def join_or(parts: list[str]) -> str:
    parts = [p for i, p in enumerate(parts) if p not in parts[:i]]
    if not parts:
        return "nothing more"
    if len(parts) == 1:
        return parts[0]
    sep = "; " if any("," in p for p in parts) else ", "
    return sep.join(parts[:-1]) + (";" if sep == "; " else "") + " or " + parts[-1]


def add_rest_words(options) -> None:
    """The words of the "what happens to the rest" options (vtdsl.ops.rest, in rank order):
    what may follow 'then', and their keywords, placed after 'rest' (messages list the
    expected words in this table's order; the grammar has always listed the keywords its
    trees leave out, `_X`, before the others)."""
    words: dict[str, str] = {}
    for option in options:
        for name, (_, english) in option.keywords.items():
            words.setdefault(name, english)
    ordered = sorted(words, key=lambda name: not name.startswith("_"))
    table = [(k, v) for k, v in TERMINAL_WORDS.items() if k not in words]
    at = [k for k, _ in table].index("_REST") + 1
    table[at:at] = [(name, words[name]) for name in ordered]
    TERMINAL_WORDS.clear()
    TERMINAL_WORDS.update(table)
    TERMINAL_WORDS["_THEN"] = ", ".join(o.then_words for o in options if o.then_words)


# Terminals whose text is a fixed keyword: name -> keyword (for "did you mean").
def keyword_of(terminal: str) -> str | None:
    words = TERMINAL_WORDS.get(terminal, "")
    if terminal in ("_PER", "_THEN"):
        return terminal.strip("_").lower()
    if words.startswith("'") and words.endswith("'") and words.count("'") == 2:
        word = words[1:-1]
        return word if word.replace("_", "").isalpha() else None
    return None
