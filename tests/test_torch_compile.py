"""`torch.compile` of a FastV-compiled model (issue 21, item 4): right logits through
prefill and decode, and what dynamo compiles, counted with its own counters.

vtdsl's LLM hooks run outside dynamo (`installer._eager`): their
per-layer closures and per-prompt Python state made dynamo recompile each hook once per
layer (tiny-llava, 2 LLM layers: 28 recompiles, 59 graphs; a second generate 20 s) until
its recompile limit. A hook is still a graph break inside the decoder-layer loop, and
dynamo does not resume inside a loop: it runs `LlamaModel.forward` uncompiled and
compiles each layer's call as a frame of its own. That frame was specialised on the
layer's cache index (`cache.layers[i]`), one recompile per layer in prefill, until the
pre-hook handed each layer its own cache layer (`vtdsl.compiler.layer_cache`).

Two ways to compile, both tested: the whole `forward` (prefill compiled; decode steps
are not: the graph breaks make transformers' shared `deprecate_kwarg` wrapper a frame at
every level, it reaches dynamo's recompile limit in the first decode step and dynamo
skips it and everything under it from then on), and `vc.compile_regions` (the layers
only: prefill and decode compiled, no break in the LLM's layers), the supported path.

The backend is aot_eager: recompiles and graph breaks are dynamo's (the same under
inductor), and inductor's code generation would take minutes here.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import vtdsl.compiler as vc

POLICY = "at llm.layer1 keep text top 50%"  # FastV's rule (policies/fastv.vt) at K=1, so 2 layers suffice
NEW = 3


def _model(llm_layers: int):
    from transformers import LlavaConfig

    from vtdsl.models import spec_from_config
    from vtdsl.models.builtins import TINY_LLAVA

    cfg = copy.deepcopy(TINY_LLAVA)
    cfg["text_config"]["num_hidden_layers"] = llm_layers
    cfg["vision_config"]["num_hidden_layers"] = 4
    config = LlavaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    spec = spec_from_config(config, name=f"tiny-llava-{llm_layers}")
    return spec.build(device="cpu", dtype="float32", seed=0, attn_implementation="sdpa")


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(3, 250, (1, 4), generator=g), torch.full((1, 576), 255),
                     torch.randint(3, 250, (1, 8), generator=g)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 336, 336, generator=g)}


def _generate(model, inputs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


def _compiled_run(llm_layers: int, policy: str = POLICY, regional: bool = False) -> dict:
    """Eager and compiled generate of the compiled model; what dynamo did. The compiled
    run installs the policy afresh, so no state of the eager run can stand in for a hook
    dynamo did not run. `regional`: the layers compiled (`vc.compile_regions`), else the
    whole forward."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters, guard_failures

    model, inputs = _model(llm_layers), _inputs()
    with vc.apply(policy, model):
        eager = _generate(model, inputs)
    graphs = []  # dynamo's graph count when each forward call starts, then at the end
    model.register_forward_pre_hook(torch.compiler.disable(lambda *_: graphs.append(_graphs())))
    with vc.apply(policy, model):
        torch._dynamo.reset()
        counters.clear()
        guard_failures.clear()
        if regional:
            vc.compile_regions(model, backend="aot_eager")
        else:
            model.forward = torch.compile(model.forward, backend="aot_eager")
        try:
            first = _generate(model, inputs)
            second = _generate(model, inputs)  # everything compiled: no new graphs
        finally:
            vc.uncompile_regions(model) if regional else delattr(model, "forward")
    graphs.append(_graphs())
    recompiles = Counter()
    for code in guard_failures:
        recompiles[(code.co_filename, code.co_name)] += len(_debug_get_cache_entry_list(code)) - 1
    out = {"eager": eager, "runs": (first, second), "recompiles": recompiles, "calls": graphs,
           "graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}
    torch._dynamo.reset()
    return out


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def runs():
    return {layers: _compiled_run(layers) for layers in (2, 4)}


def _is_layer_frame(key) -> bool:
    return key[1] == "forward_with_checkpointing"  # a decoder layer's __call__ (transformers' modeling_layers)


@pytest.mark.slow
def test_compiled_logits_equal_eager_prefill_and_decode(runs):
    for layers, r in runs.items():
        for run in r["runs"]:
            assert torch.equal(run.sequences, r["eager"].sequences), layers
            assert len(run.logits) == NEW  # the prefill's last position, then each decode step
            for got, want in zip(run.logits, r["eager"].logits):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_vit_policy_matches_eager():
    # VisionZip reads the CLS attention of a ViT layer through capture hooks: skipped by
    # dynamo when they (or the encoder's stage nodes) were torch.compiler.disable'd
    r = _compiled_run(2, "policies/visionzip-64.vt")
    for run in r["runs"]:
        assert torch.equal(run.sequences, r["eager"].sequences)
        for got, want in zip(run.logits, r["eager"].logits):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_vtdsl_code_is_never_compiled_and_the_rest_does_not_grow_with_depth(runs):
    for r in runs.values():
        assert not [key for key in r["recompiles"] if "/vtdsl/" in key[0]], r["recompiles"]
    two, four = ({k: n for k, n in runs[L]["recompiles"].items() if not _is_layer_frame(k)} for L in (2, 4))
    assert two == four  # transformers' wrappers, llava's forward: the same whatever the depth
    assert sum(two.values()) <= 16  # measured 14 (torch 2.13, transformers 5.24)
    # one graph break per hook kind and per ViT stage node, not per layer call
    assert runs[2]["graph_breaks"] == runs[4]["graph_breaks"] <= 30  # measured 22
    assert runs[4]["graphs"] == runs[2]["graphs"] <= 20  # measured 15 (was 15 and 17, and 59 for 2 layers before)


@pytest.mark.slow
def test_decoder_layer_frames_compile_once_for_all_layers(runs):
    # each layer handed its own cache layer (vtdsl.compiler.layer_cache): the frame's
    # guards name no layer index; what is left is the prefill's two row counts (before
    # and after the stage). Before: 1 recompile for 2 layers, 3 for 4 (one per layer).
    two, four = (sum(n for k, n in runs[L]["recompiles"].items() if _is_layer_frame(k)) for L in (2, 4))
    assert four == two <= 1  # measured 1


@pytest.fixture(scope="module")
def regional():
    return {layers: _compiled_run(layers, regional=True) for layers in (2, 4)}


@pytest.mark.slow
def test_regions_compile_prefill_and_decode_once_for_all_layers(regional):
    for layers, r in regional.items():
        for run in r["runs"]:
            assert torch.equal(run.sequences, r["eager"].sequences), layers
            for got, want in zip(run.logits, r["eager"].logits):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # only the layers are compiled, so every recompile is a layer frame's
        assert all(_is_layer_frame(k) for k in r["recompiles"]), r["recompiles"]
        calls = r["calls"]  # graph counts: prefill, 2 decode steps, the second generate's 3 calls, the end
        assert calls[2] > calls[1]  # the first decode step compiled its layers (full forward: not at all)
        assert calls[3] == calls[-1]  # the second generate compiles nothing
    # the ViT's layers (one class), the LLM's prefill after the stage (layer 0 carries
    # FastV's score captures and runs eager), its first decode step, then a dynamic cache length
    assert regional[2]["recompiles"] == regional[4]["recompiles"]
    assert sum(regional[2]["recompiles"].values()) <= 3  # measured 3
    assert regional[2]["graphs"] == regional[4]["graphs"] <= 8  # measured 6


@pytest.mark.slow
def test_regions_of_a_vit_policy_match_eager():
    r = _compiled_run(2, "policies/visionzip-64.vt", regional=True)
    for run in r["runs"]:
        assert torch.equal(run.sequences, r["eager"].sequences)
        for got, want in zip(run.logits, r["eager"].logits):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert r["calls"][3] == r["calls"][-1]


def _dynamic_cache(layers: int):
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache()
    cache.layers.extend(DynamicLayer() for _ in range(layers))
    return cache


def test_a_layer_cache_writes_its_own_layer_whatever_index_it_is_given():
    from torch import nn

    from vtdsl.compiler.layer_cache import LayerCache, bind_cache

    k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    cache, want = _dynamic_cache(3), _dynamic_cache(3)
    args, kwargs = bind_cache(1, nn.Linear(2, 2), (), {"cache": cache, "use_cache": True})
    view = kwargs["cache"]
    assert isinstance(view, LayerCache) and kwargs["use_cache"] is True
    got = view.update(k, v, 7)  # the attention's own index is not read
    expected = want.update(k, v, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert [cache.get_seq_length(i) for i in range(3)] == [0, 5, 0]
    assert view.get_seq_length(1) == 5  # the rest is the cache's


def test_hooked_layers_and_other_caches_keep_the_cache():
    from torch import nn
    from transformers.cache_utils import DynamicCache

    from vtdsl.compiler.layer_cache import bind_cache

    layer = nn.Sequential(nn.Linear(2, 2))
    cache = _dynamic_cache(2)
    handle = layer[0].register_forward_hook(lambda *_: None)
    assert bind_cache(0, layer, (), {"cache": cache})[1]["cache"] is cache
    handle.remove()
    assert bind_cache(0, layer, (), {"past_key_values": cache})[1]["past_key_values"] is not cache
    assert bind_cache(2, layer, (), {"cache": cache})[1]["cache"] is cache  # no such layer

    class Own(DynamicCache):
        def update(self, *args, **kwargs):
            return super().update(*args, **kwargs)

    own = Own()
    own.layers.append(_dynamic_cache(1).layers[0])
    assert bind_cache(0, layer, (), {"cache": own})[1]["cache"] is own


def test_compile_regions_wraps_every_layer_once_and_undoes_it():
    model = _model(2)
    assert vc.compile_regions(model, backend="aot_eager") == 6  # 4 ViT layers, 2 decoder layers
    assert vc.compile_regions(model, backend="aot_eager") == 0
    layers = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(layers) == 6
    assert layers[0].forward.compiled is layers[3].forward.compiled  # one per class
    assert layers[3].forward.compiled is not layers[4].forward.compiled
    assert vc.uncompile_regions(model) == 6
    assert not [m for m in model.modules() if "forward" in m.__dict__]
