"""ViT stages: an fx rewrite of the vision encoder's layer loop, plus a projector pre-hook.

The encoder (`CLIPEncoder`) is traced one level up with its layers as leaf modules
(tracing the whole HF model fails; see the package docstring). The graph is a chain
``layers.0 -> layers.1 -> ...``; the compiler inserts

- ``vtdsl_vit_begin`` after the input (resets the per-forward token bookkeeping), and
- one ``vtdsl_vit_stage<i>`` node before ``layers.N`` for each stage at ``vit.layerN``
  (CLS is always kept),

and swaps the encoder module for the resulting `GraphModule`, whose submodule paths
(``layers.i``) and therefore state-dict keys are the original ones.

`vit.out` stages run in a forward pre-hook on the projector, on the features after the
select strategy dropped CLS (on merged features, InternVL's, SmolVLM's, Gemma 3's, the
pixel-shuffled or pooled tokens: `vtdsl.compiler.vit_groups`, which also adds a
``vtdsl_vit_end`` node after the last layer). A stage at ``vit.layer{f+1}``
(f = feature layer) also
defines the features: its fx node runs after transformers captured layer f's output as a
hidden state, so the projector hook substitutes that node's output for the features.

Scores read the projections their `vtdsl.ops.scorers` entry names, captured by forward hooks
on ``layers.l.self_attn.{q,k,v}_proj`` (or a layer's output, for an entry that names none),
and are computed by the entry's kernel.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import ops
from ..ir.plan import Observation, Plan, ResolvedStage
from ..ops.scorers import ScoreContext, by_canonical
from .runtime import CompileError, ForwardLog, Scored, StageView, Tokens, _align


def _encoder_output(hidden_states: Tensor):
    """Wrap the last hidden state the way `CLIPEncoder.forward` does."""
    from transformers.modeling_outputs import BaseModelOutput

    return BaseModelOutput(last_hidden_state=hidden_states)


class _LayerLoopTracer(fx.Tracer):
    """Traces an encoder's forward with each ``<prefix>N`` layer as a leaf module."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname.startswith(self.prefix) and qualname[len(self.prefix) :].isdigit():
            return True
        return super().is_leaf_module(m, qualname)


class _TraceRoot(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, inputs_embeds):
        # positional: CLIP / SigLIP name it `inputs_embeds`, InternViT `hidden_states`
        return self.encoder(inputs_embeds).last_hidden_state


# encoder -> its traced layer loop: the graph holds no weights (layers are leaves), so one
# trace serves every policy compiled onto that encoder; tracing is most of a ViT compile
_TRACED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def trace_layer_loop(encoder: nn.Module, num_layers: int, layers: str = "layers") -> fx.Graph:
    """The encoder's layer loop as an fx graph whose call_module targets are ``<layers>.i``
    (`layers`: the encoder's name for its layer list, ``layers`` or InternViT's ``layer``);
    a fresh copy of the encoder's cached trace."""
    traced = _TRACED.setdefault(encoder, {})
    key = (num_layers, layers)
    if key not in traced:
        traced[key] = _trace_layer_loop(encoder, num_layers, layers)
    graph = fx.Graph()
    graph.output(graph.graph_copy(traced[key], {}))
    return graph


def _trace_layer_loop(encoder: nn.Module, num_layers: int, layers: str) -> fx.Graph:
    try:
        graph = _LayerLoopTracer(f"encoder.{layers}.").trace(_TraceRoot(encoder))
    except Exception as exc:  # noqa: BLE001 - report any tracing failure as a compile error
        raise CompileError(f"torch.fx could not trace {type(encoder).__name__}: {exc}") from exc
    layer_nodes = []
    for node in graph.nodes:
        if node.op == "call_module":
            node.target = node.target.removeprefix("encoder.")
            layer_nodes.append(node)
            try:  # cosmetic: `layers_3` instead of `encoder_layers_3` in the listing
                node._rename(node.target.replace(".", "_"))
            except AttributeError:  # pragma: no cover - private fx API
                pass
    expected = [f"{layers}.{i}" for i in range(num_layers)]
    if [n.target for n in layer_nodes] != expected:
        raise CompileError(
            f"traced {type(encoder).__name__} calls {[n.target for n in layer_nodes]}, expected {expected}"
        )
    for prev, node in zip(layer_nodes, layer_nodes[1:]):
        if node.args[0] is not prev:
            raise CompileError(f"traced {type(encoder).__name__} is not a simple layer chain at {node.target}")
    return graph


class _VitBegin(nn.Module):
    def __init__(self, rt: "VitRuntime"):
        super().__init__()
        self.rt = rt

    def forward(self, x: Tensor) -> Tensor:
        self.rt.begin(x)
        return x


class _VitStage(nn.Module):
    def __init__(self, rt: "VitRuntime", stage: ResolvedStage):
        super().__init__()
        self.rt = rt
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.rt.run_stage(self.stage, x)

    def extra_repr(self) -> str:
        s = self.stage
        return f"{s.site.text()}: {s.action} {s.tokens_in} -> {s.tokens_out}"


class _VitEnd(nn.Module):
    def __init__(self, rt):
        super().__init__()
        self.rt = rt

    def forward(self, x: Tensor) -> Tensor:
        return self.rt.finish(x)


class VitRuntime:
    """Bookkeeping of the vision tower for one compiled model."""

    def __init__(self, plan: Plan, num_heads: int, log: ForwardLog):
        spec = plan.spec
        self.spec = spec
        self.plan = plan
        self.num_heads = num_heads
        self.log = log
        self.has_cls = spec.has_cls
        self.feature_entry = spec.feature_layer_index + 1
        self.drop_cls = spec.has_cls and spec.select_strategy == "default"
        self.ids = spec.patch_tokens + 1
        self.out_stages = [s for s in plan.stages if s.site.tower == "vit" and s.site.layer is None]
        self.needs_cls_feature = any(s.keep_cls for s in self.out_stages)
        # layers whose keys a `merge rest ... by keys` stage matches on: kept after scoring
        self.keep_keys = {s.rest.keys_layer for s in plan.stages if s.rest is not None and s.rest.keys_layer is not None}
        self.layers: nn.ModuleList | None = None  # the encoder's layers, set by `build_vit`
        self.aux = None  # `clip_text`'s text encoder (ScoreContext.aux), set by the installer
        self.attn_obs_at: dict[int, list[Observation]] = {}
        # projections each layer's observations read: scored once all of them are captured
        self.needs: dict[int, set[str]] = {}
        for o in plan.observations:
            projections = by_canonical(o.scorer).projections  # () = the layer's output, read at the stage
            if o.tower == "vit" and projections:
                self.attn_obs_at.setdefault(o.layer, []).append(o)
                self.needs.setdefault(o.layer, set()).update(projections)
        self.reset()

    def reset(self) -> None:
        self.tokens: Tokens | None = None  # rows of the ViT hidden state (CLS included)
        self.feature_tokens: Tokens | None = None
        self.feature_override: Tensor | None = None
        self.surplus = 0  # padding rows per projector row (image or crop) after the projector (adaptive counts)
        self.projector_tokens: Tokens | None = None  # per image, what the LLM receives
        self.cls_feature: Tensor | None = None  # [G, 1, d]: CLS at the feature layer (`cls_token`)
        self.captured: dict[int, dict[str, Any]] = {}
        self.scored: dict[Observation, Scored] = {}
        self.merged: dict[Observation, Scored] = {}

    # -------------------------------------------------------------- graph nodes
    def begin(self, x: Tensor) -> None:
        self.reset()
        self.tokens = Tokens.initial(x.shape[0], self.spec.grid, x.device, self.has_cls)
        self.feature_tokens = self.tokens
        self.captured[-1] = {"h": x, "tokens": self.tokens}

    def run_stage(self, stage: ResolvedStage, x: Tensor) -> Tensor:
        if self.tokens is None or self.tokens.count != x.shape[1]:
            raise CompileError("ViT token bookkeeping is out of step with the hidden states")
        lead = 1 if self.has_cls else 0
        cand_tokens = self.tokens.drop_first() if lead else self.tokens
        view = StageView(x[:, lead:], cand_tokens, lambda obs: self._aligned(obs, view.tokens.vid),
                         total_of=lambda obs: self.total_of(obs, x.shape[0]),
                         keys_of=lambda layer: self.keys_of(layer, view.tokens.vid))
        key = f"{stage.site.text()}#{stage.index}"
        values, _src, new = self.log.run(key, stage, view)
        out = torch.cat([x[:, :lead], values], dim=1)
        if lead:
            new = Tokens(
                torch.cat([self.tokens.vid[:, :1], new.vid], 1),
                torch.cat([self.tokens.gpos[:, :1], new.gpos], 1),
                new.grid,
            )
        self.tokens = new
        self.log.vit[key] = (x.shape[1] - lead, values.shape[1])
        self.log.kept[key] = new.vid[:, lead:]
        if stage.site.layer <= self.feature_entry:
            self.feature_tokens = new
        if stage.site.layer == self.feature_entry:
            self.feature_override = out
        return out

    # -------------------------------------------------------------- hooks
    def capture(self, layer: int, key: str, value: Tensor) -> None:
        slot = self.captured.setdefault(layer, {})
        slot[key] = value
        slot["tokens"] = self.tokens
        needs = self.needs.get(layer, ())
        if needs and all(k in slot for k in needs):
            # score now and let the projections go instead of holding them to the stage
            for obs in self.attn_obs_at.get(layer, ()):
                self.observe(obs)
            for k in needs:
                if not (k == "k" and layer in self.keep_keys):
                    del slot[k]

    def projector_pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        (x,) = args[:1]
        if self.feature_tokens is None:
            raise CompileError("the projector ran without the compiled vision encoder")
        x, tokens = self.projector_input(x)
        if tokens.count != x.shape[1] or tokens.vid.shape[0] != x.shape[0]:
            raise CompileError(
                f"projector input has {tuple(x.shape[:2])} tokens, bookkeeping expects "
                f"{(tokens.vid.shape[0], tokens.count)}"
            )
        lead = 1 if (self.has_cls and not self.drop_cls) else 0
        for stage in self.out_stages:
            if stage.keep_cls:  # the IR allows it only in the last vit.out stage, lead 0
                n_in = tokens.count
                values, _src, new = self.log.run(f"vit.out#{stage.index}", stage,
                                                 StageView(x, tokens, lambda obs: self._aligned(obs, tokens.vid),
                                                           total_of=lambda obs: self.total_of(obs, x.shape[0]),
                                                           keys_of=lambda layer: self.keys_of(layer, tokens.vid)))
                if self.cls_feature is None or self.cls_feature.shape[0] != x.shape[0]:
                    raise CompileError("'cls_token' found no CLS feature from the vision tower")
                x = torch.cat([self.cls_feature.to(values.dtype), values], dim=1)
                new = Tokens(torch.cat([torch.zeros_like(new.vid[:, :1]), new.vid], 1),
                             torch.cat([torch.full_like(new.gpos[:, :1], -1), new.gpos], 1), new.grid)
                tokens = new
                self.log.vit[f"vit.out#{stage.index}"] = (n_in, x.shape[1])
                self.log.kept[f"vit.out#{stage.index}"] = new.vid
                continue
            cand = tokens.drop_first() if lead else tokens
            view = StageView(x[:, lead:], cand, lambda obs: self._aligned(obs, view.tokens.vid),
                             total_of=lambda obs: self.total_of(obs, x.shape[0]),
                             keys_of=lambda layer: self.keys_of(layer, view.tokens.vid))
            n_in = cand.count
            values, _src, new = self.log.run(f"vit.out#{stage.index}", stage, view)
            x = torch.cat([x[:, :lead], values], dim=1)
            if lead:
                new = Tokens(
                    torch.cat([tokens.vid[:, :1], new.vid], 1), torch.cat([tokens.gpos[:, :1], new.gpos], 1), new.grid
                )
            tokens = new
            self.log.vit[f"vit.out#{stage.index}"] = (n_in, values.shape[1])
            self.log.kept[f"vit.out#{stage.index}"] = new.vid[:, lead:]
        self.projector_tokens = tokens
        return (x, *args[1:])

    def projector_input(self, x: Tensor) -> tuple[Tensor, Tokens]:
        """The projector's input `x` as vit.out stages see it, and its tokens' identities."""
        if self.feature_override is not None:
            x = self.feature_override[:, 1:] if self.drop_cls else self.feature_override
        return x, self.feature_tokens.drop_first() if self.drop_cls else self.feature_tokens

    def pad_features(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Projector post-hook under adaptive ViT counts: the prompt holds room for the
        plan's bound per image (per crop on anyres models, whose crops all get the call's
        one count); pad each row's features to it with zero rows at the end, which the
        LLM-input hook removes again (`LlmRuntime._trim`)."""
        room = self.plan.projector_tokens // self.spec.vit_crops
        have = output.shape[1]
        if have > room:
            raise CompileError(f"the vision tower kept {have} tokens per image, more than the {room} planned")
        self.surplus = room - have
        if not self.surplus:
            return output
        return torch.cat([output, output.new_zeros(output.shape[0], self.surplus, *output.shape[2:])], dim=1)

    # -------------------------------------------------------------- scores
    def observe(self, obs: Observation) -> Scored:
        """Scores of a ViT observation over the patch tokens it was read from (cached)."""
        done = self.scored.get(obs)
        if done is not None:
            return done
        cap = self.captured.get(obs.layer)
        if cap is None:
            raise CompileError(f"nothing was captured at vit.layer{obs.layer} for '{obs.scorer}'")
        lead = 1 if self.has_cls else 0
        info = by_canonical(obs.scorer)
        if "vit" not in info.towers or info.kernel is None:
            raise CompileError(f"scorer '{obs.scorer}' cannot be read in the ViT")
        values = info.kernel(ScoreContext(obs, cap, self.num_heads, lead=lead, layer=self._layer,
                                          aux=self.aux))
        done = self.scored[obs] = self.scored_patches(values, cap)
        return done

    def scored_patches(self, values: Tensor, cap: dict[str, Any]) -> Scored:
        """A kernel's values ``[G, patches]`` over the rows captured in `cap`, by identity."""
        lead = 1 if self.has_cls else 0
        return Scored(values, cap["tokens"].vid[:, lead:], "vid", self.ids)

    def _layer(self, i: int) -> nn.Module:
        if self.layers is None or not 0 <= i < len(self.layers):
            raise CompileError(f"the vision tower has no layer {i}")
        return self.layers[i]

    def keys_of(self, layer: int, vid: Tensor) -> Tensor:
        """``[G, n, dh]``: the attention keys of ViT `layer` (its k_proj output, head
        mean) of the tokens `vid`, which must have been present at that layer."""
        cap = self.captured.get(layer, {})
        if "k" not in cap:
            raise CompileError(f"'by keys' found no keys captured at vit.layer{layer}")
        k, tokens = cap["k"], cap["tokens"]
        g, n_l = k.shape[:2]
        keys = k.view(g, n_l, self.num_heads, -1).mean(2)
        where = torch.full((g, self.ids), -1, dtype=torch.long, device=k.device)
        where.scatter_(1, tokens.vid, torch.arange(n_l, device=k.device)[None].expand(g, -1))
        idx = where.gather(1, vid)
        if bool((idx < 0).any()):
            raise CompileError(f"'by keys': a token was not present at vit.layer{layer}")
        return ops.gather_tokens(keys, idx)

    def total_of(self, obs: Observation, rows: int) -> Tensor | None:
        """``[rows, 1]``: a ViT observation's sum over the patches it was read on (the
        denominator of `share`); None for an LLM observation."""
        if obs.tower != "vit":
            return None
        total = self.observe(obs).values.float().nansum(-1, keepdim=True)
        if total.shape[0] != rows:
            if total.shape[0] == 0 or rows % total.shape[0]:
                raise CompileError(f"cannot align scores of {total.shape[0]} rows to {rows} rows")
            total = total.repeat_interleave(rows // total.shape[0], 0)
        return total

    def _aligned(self, obs: Observation, vid: Tensor) -> Tensor:
        if obs.tower != "vit":
            raise CompileError(f"a ViT stage cannot read the LLM observation at llm.layer{obs.layer}")
        return _align(self.observe(obs), vid)


def build_vit(model: nn.Module, plan: Plan, rt: VitRuntime, encoder_path: str) -> tuple[nn.Module, fx.GraphModule]:
    """The original encoder and its fx rewrite (not installed yet)."""
    spec = plan.spec
    encoder = model.get_submodule(encoder_path)
    listed = spec.vit_layer_path.format(i=0).rpartition(".")[0].rpartition(".")[2]  # "layers" (CLIP), "layer"
    rt.layers = getattr(encoder, listed)
    layer_stages = [s for s in plan.stages if s.site.tower == "vit" and s.site.layer is not None]
    graph = trace_layer_loop(encoder, spec.vit.layers, listed)
    modules: dict[str, nn.Module] = {f"{listed}.{i}": rt.layers[i] for i in range(spec.vit.layers)}
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(placeholder):
        begin = graph.call_module("vtdsl_vit_begin", (placeholder,))
    placeholder.replace_all_uses_with(begin, delete_user_cb=lambda user: user is not begin)
    modules["vtdsl_vit_begin"] = _VitBegin(rt)
    layer_nodes = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target.startswith(f"{listed}.")}
    for stage in layer_stages:
        node = layer_nodes[f"{listed}.{stage.site.layer}"]
        name = f"vtdsl_vit_stage{stage.index}"
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
        node.update_arg(0, new)
        modules[name] = _VitStage(rt, stage)
    output = next(n for n in graph.nodes if n.op == "output")
    last = output.args[0]
    if layer_stages and hasattr(rt, "finish"):  # the tower's output laid out as the unpruned one
        with graph.inserting_before(output):
            last = graph.call_module("vtdsl_vit_end", (last,))
        modules["vtdsl_vit_end"] = _VitEnd(rt)
    with graph.inserting_before(output):
        wrapped = graph.call_function(_encoder_output, (last,))
    output.args = (wrapped,)
    with graph.inserting_after(placeholder):
        kwargs_node = graph.placeholder("**kwargs")
    with graph.inserting_after(placeholder):
        graph.placeholder("attention_mask", default_value=None)
    del kwargs_node
    graph.lint()
    gm = fx.GraphModule(modules, graph, class_name=f"Vtdsl{type(encoder).__name__}")
    for attr in ("config", "gradient_checkpointing"):
        if hasattr(encoder, attr):
            setattr(gm, attr, getattr(encoder, attr))
    return encoder, gm
