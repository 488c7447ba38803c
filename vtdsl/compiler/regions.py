"""`torch.compile` of a model's layers, compiled or not by vtdsl ("regional compilation",
docs/compiler.md, "torch.compile").

Compiling the whole `forward` of a model carrying vtdsl's LLM hooks leaves its decode steps
uncompiled: each hook is a graph break, every decorated transformers function on the stack
then becomes a frame of its own, and they all share the code of transformers'
`deprecate_kwarg` wrapper, which reaches dynamo's recompile limit (8) in the first decode
step; dynamo then skips it and everything below it for good (tests/test_torch_compile.py).
Compiling the layers alone avoids the glue: every layer of a class runs one compiled
`forward`, with the hooks outside it, and each decoder layer is handed its own cache layer
(`layer_cache.bind_cache`), so the frame names no layer index and compiles once for all
layers.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .layer_cache import bind_cache, hooked


class _Region:
    """A layer's `forward`: the class's compiled forward, or the eager one while hooks sit
    on the layer's submodules (dynamo does not guard them: a frame compiled for one layer
    would run for another without its hooks, or with the first one's)."""

    def __init__(self, layer: nn.Module, index: int, compiled: Callable):
        self.layer, self.index, self.compiled = layer, index, compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        if hooked(layer):
            return type(layer).forward(layer, *args, **kwargs)
        args, kwargs = bind_cache(self.index, layer, args, kwargs)
        return self.compiled(layer, *args, **kwargs)


def compile_regions(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile the `forward` of every transformers layer of `model` (the LLM's decoder
    layers, the vision tower's encoder layers) with ``torch.compile(**compile_kwargs)``,
    one compiled function per layer class; returns how many layers. vtdsl policies may be
    applied and removed before or after; `uncompile_regions` undoes it."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    by_class: dict[type, Callable] = {}
    count = 0
    for name, layer in model.named_modules():
        last = name.rpartition(".")[2]
        if not isinstance(layer, GradientCheckpointingLayer) or not last.isdigit():
            continue
        if isinstance(layer.__dict__.get("forward"), _Region):
            continue
        cls = type(layer)
        if cls not in by_class:
            by_class[cls] = torch.compile(cls.forward, **compile_kwargs)
        layer.forward = _Region(layer, int(last), by_class[cls])
        count += 1
    return count


def uncompile_regions(model: nn.Module) -> int:
    """Give every layer `compile_regions` compiled its class's `forward` back; returns how
    many."""
    count = 0
    for layer in model.modules():
        if isinstance(layer.__dict__.get("forward"), _Region):
            del layer.forward
            count += 1
    return count
