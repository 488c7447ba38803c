"""Each decoder layer handed its own cache layer, so that `torch.compile` compiles one
layer's code once for every layer (docs/compiler.md, "torch.compile").

vtdsl's LLM pre-hooks run outside dynamo (`installer._eager`), so dynamo cannot trace the
decoder-layer loop in one piece: it runs the loop in Python and compiles each layer's
`forward` as a frame of its own. transformers' attention calls
``cache.update(k, v, self.layer_idx)``, which indexes ``cache.layers`` with the layer's
index: dynamo guards the compiled frame on that index (and on the state of that cache
layer), one recompile per decoder layer. The pre-hook, which already runs before every
layer, hands the layer a `LayerCache` instead: ``update`` goes to the layer's own cache
layer whatever index it is passed, so the frame's guards name no index.

Dynamo does not guard the hooks of submodules (`torch._dynamo.config.skip_nnmodule_hook_guards`):
a frame compiled at a layer without hooks would also run for a layer whose attention
carries one (a score's capture, a decode selection), without calling it. Such layers keep
the cache itself; its type and their index keep their frames apart.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


class LayerCache:
    """Layer `index`'s view of a transformers `Cache`: `update` writes that layer's entry;
    everything else is the cache's."""

    def __init__(self, cache: Any, index: int):
        self.cache = cache
        self.layer = cache.layers[index]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layer.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("cache", "layer"):  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.cache, name)


def _plain(cache: Any, index: int) -> bool:
    """Whether `cache.update(..., index)` only writes ``cache.layers[index]`` (no offloading,
    no layer created on the way, `update` not overridden)."""
    from transformers.cache_utils import Cache

    return (isinstance(cache, Cache) and type(cache).update is Cache.update and not getattr(cache, "offloading", False)
            and index < len(getattr(cache, "layers", ())))


def hooked(layer: nn.Module) -> bool:
    """Whether hooks sit on any submodule of `layer` (its own run outside its `forward`),
    other than transformers' output-capturing hooks, which every layer of a class carries
    alike."""
    return any(not _capturing(h) for m in layer.modules() if m is not layer
               for hooks in (m._forward_hooks, m._forward_pre_hooks) for h in hooks.values())


def _capturing(hook: Any) -> bool:
    return getattr(hook, "__code__", None) is _capture_code()


@functools.cache
def _capture_code() -> Any:
    """The code of transformers' output-capturing hook (None where it has none), which
    records a layer's output into the collector of the running call, whichever layer."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    install = getattr(output_capturing, "install_output_capuring_hook", None)  # sic
    consts = install.__code__.co_consts if install is not None else ()
    return next((c for c in consts if getattr(c, "co_name", None) == "output_capturing_hook"), None)


def bind_cache(index: int, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A decoder layer's call arguments with its cache replaced by the layer's `LayerCache`
    (unchanged where the cache is not a plain one or the layer's submodules carry hooks)."""
    key = "cache" if "cache" in kwargs else "past_key_values"
    cache = kwargs.get(key)
    if cache is None or isinstance(cache, LayerCache) or not _plain(cache, index) or hooked(layer):
        return args, kwargs
    return args, {**kwargs, key: LayerCache(cache, index)}
