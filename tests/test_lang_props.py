"""Property tests: random ASTs round-trip through .vt and YAML; random input never crashes."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtdsl.lang import PolicyError, format_policy, format_source, from_yaml, parse, to_yaml
from vtdsl.lang import ast as A
from vtdsl.lang.scorers import COMBINERS, SCORERS
from vtdsl.lang.source import decode
from vtdsl.ops.rest.absorb import Absorb
from vtdsl.ops.rest.cells import Cells
from vtdsl.ops.rest.merge import MergeRest
from vtdsl.ops.rest.recycle import Recycle

# Modest counts keep this file at a few seconds; VTDSL_PROPS_SCALE=20 runs a deep soak.
_SCALE = float(os.environ.get("VTDSL_PROPS_SCALE", "1"))
FAST = settings(max_examples=int(150 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=int(300 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- random valid ASTs ----------------------------------------------------------------

layer = st.integers(-40, 40)
sites = st.one_of(
    st.builds(A.Site, tower=st.sampled_from(["vit", "llm"]), index=layer),
    st.just(A.Site(tower="vit", index=None)),
)
percent_values = st.one_of(
    st.integers(0, 100),
    st.floats(0, 100, allow_nan=False, allow_infinity=False),
    st.decimals(0, 100, places=3).map(float),
)
quantities = st.one_of(
    st.builds(A.Quantity, value=st.integers(0, A.MAX_COUNT)),
    st.builds(A.Quantity, value=percent_values, percent=st.just(True)),
)


@st.composite
def score_refs(draw):
    name = draw(st.sampled_from(sorted(SCORERS)))
    info = SCORERS[name]
    args = draw(st.lists(st.sampled_from(info.args), max_size=info.max_args)) if info.args else []
    at = draw(st.none() | sites)
    return A.ScoreRef(name=name, args=args, at=at)


_NARY = [op for op in COMBINERS if op != "share"]
scores = st.recursive(
    score_refs(),
    lambda inner: st.lists(inner, min_size=2, max_size=3).flatmap(lambda args: st.builds(
        A.ScoreCombine, op=st.sampled_from(_NARY), args=st.just(args),
        weights=st.none() | st.lists(st.sampled_from([1.0, 0.5, 2.0, 0.09, 1000.0, 1e-4]),
                                     min_size=len(args), max_size=len(args)).filter(lambda w: any(x != 1 for x in w))))
    | inner.map(lambda arg: A.ScoreCombine(op="share", args=[arg])),
    max_leaves=6,
)
terms = st.one_of(
    st.builds(A.TopTerm, score=scores, qty=quantities),
    st.builds(A.SelectTerm, kind=st.sampled_from(["diverse", "uniform", "unique"]), qty=quantities),
    st.builds(A.SelectTerm, kind=st.just("diverse"), qty=quantities, spread=st.just("sum")),
    st.builds(A.SelectTerm, kind=st.just("random"), qty=quantities, seed=st.none() | st.integers(0, 2**63 - 1)),
    st.builds(A.BuffersTerm, qty=st.none() | quantities),
)
regions = st.one_of(
    st.none(),
    st.just(A.Region(kind="crop")),
    st.builds(A.Region, kind=st.just("region"), rows=st.integers(1, 64), cols=st.integers(1, 64)),
)
grids = st.integers(1, 64)
rests = st.one_of(  # every "what happens to the rest" option (vtdsl/ops/rest/)
    st.none(),
    st.builds(MergeRest, into=quantities, added=st.booleans(), by=st.sampled_from(["tokens", "keys"])),
    st.builds(Recycle, count=quantities, clusters=quantities),
    st.builds(Absorb, neighbours=quantities),
    st.builds(Cells, rows=grids, cols=grids),
)
actions = st.one_of(
    st.builds(A.Keep, terms=st.lists(terms, min_size=1, max_size=4), region=regions, rest=rests),
    st.builds(A.Merge, pairs=quantities),
    st.builds(A.Pool, rows=st.integers(1, 64), cols=st.integers(1, 64)),
    st.just(A.DropAll()),
)
stages = st.builds(A.Stage, site=sites, action=actions, renumber=st.booleans())
budgets = st.one_of(
    st.builds(A.Budget, metric=st.sampled_from(["flops", "flops_fastv", "tokens", "kv"]), op=st.sampled_from(["<=", "<"]),
              value=st.one_of(st.integers(0, 10**15), st.floats(0, 1e15, allow_nan=False)), percent=st.just(False)),
    st.builds(A.Budget, metric=st.sampled_from(["flops", "tokens"]), op=st.sampled_from(["<=", "<"]),
              value=percent_values, percent=st.just(True)),
)
names = st.none() | st.text(max_size=20) | st.text(alphabet='a "\\\n\t\r\x00\x85é😀\u2028#;', max_size=8)
policies = st.builds(A.Policy, name=names, model=names, budgets=st.lists(budgets, max_size=3),
                     stages=st.lists(stages, max_size=5))


@FAST
@given(policies)
def test_vt_round_trip(policy: A.Policy):
    text = format_policy(policy)
    parsed = parse(text)
    assert parsed == policy
    assert format_policy(parsed) == text
    assert format_source(text) == text


@FAST
@given(policies)
def test_yaml_round_trip(policy: A.Policy):
    assert from_yaml(to_yaml(policy)) == policy


# ---- random input: a Policy or a PolicyError, nothing else ----------------------------

WORDS = [
    "at", "keep", "merge", "pool", "drop", "all", "top", "diverse", "uniform", "unique", "random", "seed",
    "buffers", "per", "crop", "region", "then", "rest", "into", "policy", "model", "budget", "flops",
    "flops_fastv", "tokens", "kv", "mean", "sum", "max", "cls", "attn", "text", "norm", "anchors", "registers",
    "last", "vit.layer16", "vit.layer-2", "vit.out", "llm.layer2", "llm.out", "vit.layr16", "kep", "divers",
    "0", "64", "10%", "12.5%", "150%", "1e3", "1e999", "2x2", "0x3", "99999999999999999999999999999999",
    '"name"', '"bad', "(", ")", ",", "@", "+", ";", "\n", "#", "<=", "<", ">=", "%", "-", "$", "\x00", "\u00a0",
    "\ufeff", "\r\n", "\t",
]
token_soup = st.lists(st.sampled_from(WORDS), max_size=25).map(" ".join)
text_or_soup = st.one_of(st.text(max_size=80), token_soup)


@FUZZ
@given(text_or_soup)
def test_any_text_parses_or_fails_cleanly(text: str):
    try:
        policy = parse(text)
    except PolicyError as err:
        assert err.diagnostics and err.format()
        return
    assert isinstance(policy, A.Policy)
    assert parse(format_policy(policy)) == policy


@FUZZ
@given(st.binary(max_size=80) | token_soup.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_bytes_parse_or_fail_cleanly(data: bytes):
    try:
        parse(decode(data, "fuzz.vt"), "fuzz.vt")
    except PolicyError as err:
        assert err.format().startswith("fuzz.vt:")


yaml_soup = st.lists(
    st.sampled_from(["policy:", "model:", "budget:", "stages:", "- at:", "keep:", "merge:", "pool:", "drop:", "per:",
                     "merge_rest_into:", "vit.layer16", "llm.layer2", "cls top 10%", "diverse 64", "2x2", "all", "[", "]",
                     "{", "}", ",", "&a", "*a", "\n", "\n  ", "\n    ", "'", '"', "#", "!!binary", "~", "64"]),
    max_size=25,
).map(" ".join)


@FUZZ
@given(st.one_of(st.text(max_size=80), yaml_soup))
def test_any_yaml_parses_or_fails_cleanly(text: str):
    try:
        policy = from_yaml(text)
    except PolicyError as err:
        assert err.diagnostics and err.format()
        return
    assert from_yaml(to_yaml(policy)) == policy


@FAST
@given(policies, st.lists(st.sampled_from(["# c", "#", "  # indented", ""]), max_size=6), st.randoms())
def test_format_source_keeps_every_comment(policy: A.Policy, comments: list[str], rnd):
    lines = format_policy(policy).splitlines()
    for c in comments:
        lines.insert(rnd.randint(0, len(lines)), c)
    text = "\n".join(lines) + "\n"
    once = format_source(text)
    assert format_source(once) == once
    assert parse(once) == policy
    assert sum(l.lstrip().startswith("#") for l in once.splitlines()) == sum(c.strip().startswith("#") for c in comments)
