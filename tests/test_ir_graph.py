"""The IR graph's shape and the `check` entry point."""

from __future__ import annotations

import pytest

from vtdsl.ir import check, lower
from vtdsl.ir.graph import SINK, SOURCE, stream
from vtdsl.lang import parse
from vtdsl.lang.errors import PolicyError

DESIGN = 'policy "design"\nat vit.layer16 keep anchors top 10% + buffers; at llm.layer2 keep diverse 64\n'


def test_lowered_graph_has_stream_and_observations():
    graph = lower(parse("at vit.out keep mean(cls@vit.layer8, cls@vit.layer12) top 64 + diverse 8"))
    assert stream(graph) == ["stage:0"]
    observes = sorted(n for n, d in graph.nodes(data=True) if d["kind"] == "observe")
    assert len(observes) == 2
    assert all(list(graph.successors(n)) == ["select:0"] for n in observes)
    assert graph.has_edge(SOURCE, "stage:0") and graph.has_edge("stage:0", "select:0")
    assert graph.has_edge("select:0", SINK)


def test_check_annotates_stream_edges_with_token_counts():
    plan = check(DESIGN, "llava-1.5-7b")
    assert [(s.tokens_in, s.tokens_out) for s in plan.stages] == [(576, 290), (290, 64)]
    assert plan.visual_tokens_to_llm == 290
    assert plan.llm_visual[2:] == [64] * 30
    obs = plan.observations
    assert len(obs) == 1 and (obs[0].tower, obs[0].layer, obs[0].scorer) == ("vit", 15, "attn")


def test_check_error_carries_source_line_and_caret():
    with pytest.raises(PolicyError) as info:
        check("at llm.layer2 keep cls top 10\n", "llava-1.5-7b", filename="p.vt")
    text = info.value.format()
    assert text.startswith("p.vt:1:20: error: 'cls' is only available at ViT layers")
    assert "  at llm.layer2 keep cls top 10\n                     ^^^" in text


def test_check_reports_every_error_of_a_pass():
    source = "at vit.layer40 keep cls top 8\nat llm.layer99 keep text top 8\n"
    with pytest.raises(PolicyError) as info:
        check(source, "llava-1.5-7b")
    assert [d.span.line for d in info.value.diagnostics] == [1, 2]


def test_keep_everything_is_legal_and_changes_nothing():
    plan = check("at llm.layer2 keep text top 100%", "llava-1.5-7b")
    assert plan.llm_visual == [576] * 32 and plan.diagnostics == []


def test_check_accepts_a_path(tmp_path):
    path = tmp_path / "p.vt"
    path.write_text(DESIGN)
    assert check(str(path), "llava-1.5-7b").projector_tokens == 290


def test_stream_has_select_merge_and_drop_nodes_with_counted_edges():
    from vtdsl.ir import build_graph
    from vtdsl.ir.graph import stream_nodes
    from vtdsl.models import get_spec

    source = "at vit.out keep cls top 54 then merge rest into 10\nat llm.layer2 merge 20\nat llm.layer8 drop all\n"
    graph = build_graph(parse(source), get_spec("llava-1.5-7b"))
    nodes = stream_nodes(graph)
    assert [graph.nodes[n]["kind"] for n in nodes] == [
        "source", "stage", "select", "merge", "stage", "merge", "stage", "drop", "sink"]
    tokens = [graph.edges[a, b]["tokens"] for a, b in zip(nodes, nodes[1:])]
    # 576 enter; 54 kept then 10 contextual = 64; ToMe merges 20 pairs = 44; drop leaves 0
    assert tokens == [576, 576, 54, 64, 64, 44, 44, 0]
    assert [graph.nodes[n]["kind"] for n in graph.predecessors("select:0")] == ["stage", "observe"]
