"""ViT stages on towers that hand a merger whole merge units (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Such a tower runs on one packed sequence of every image's patches, ordered so that each
`spatial_merge`² group (a merge unit: 2x2 patches, one LLM token) is `m²` consecutive rows;
Qwen2.5-VL also orders the units by attention window (`get_vision_window_index`). The
merger reads the units as they come, so a ViT stage keeps or drops whole units:

- the candidates of a stage at ``vit.layerN`` are the units entering block N, each the
  concatenation of its `m²` patch rows (``[G, k, m²·d]``); scores read in the tower are
  per patch and summed over each unit's patches;
- kept units stay in the tower's order; each block after the stage attends over the kept
  units only: full-attention blocks per image (`cu_seqlens` of the kept patches), window
  blocks per window (consecutive kept units of one window), and every kept patch keeps
  its own 2-D rotary position (the cos/sin rows of the kept patches, gathered);
- ``vit.out`` is after the merger: one token per unit, LLM-wide, in raster order (what the
  LLM receives).

The tower's output keeps the unpruned layout (one row per unit, zeros for the dropped
ones) so the prompt's placeholders and the model's M-RoPE positions stay the processor's;
the LLM-input hook removes the dropped units' rows (`LlmRuntime`), keeping the positions
of the kept ones, as an `llm.layer0` stage does. The whole tower forward is replaced on
the instance (`install`), its modules untouched. What a family's tower computes besides
patch embedding, blocks and merger (Qwen3-VL: learned positions, DeepStack features) is
its `Family.unit_tower_extras`, called before block 0, after each block and on the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import ops
from ..ir.plan import Observation, Plan, ResolvedStage
from ..ops.scorers import ScoreContext, by_canonical
from .families.base import TowerExtras
from .layouts import PlanCache
from .runtime import CompileError, ForwardLog, Scored, StageView, Tokens
from .vit import VitRuntime

if TYPE_CHECKING:  # pragma: no cover
    from .installer import Installer


def unit_order(rows: int, cols: int, window: int) -> Tensor:
    """``[rows·cols]``: the raster index of the unit in each slot of the tower's sequence
    for a grid of `rows` x `cols` merge units; windows of `window` x `window` units tile it
    from the top left, window by window (0: raster order, no windows)."""
    index = torch.arange(rows * cols).view(rows, cols)
    if not window:
        return index.flatten()
    parts = []
    for r in range(0, rows, window):
        for c in range(0, cols, window):
            parts.append(index[r:r + window, c:c + window].flatten())
    return torch.cat(parts)


def window_lengths(units: Tensor, cols: int, window: int) -> list[int]:
    """Lengths of the runs of consecutive units (raster indices ``[k]`` in tower order) that
    share an attention window: the windows the kept units attend in."""
    wid = (units // cols // window) * 10**6 + (units % cols) // window
    change = torch.ones_like(wid, dtype=torch.bool)
    change[1:] = wid[1:] != wid[:-1]
    starts = change.nonzero().flatten().tolist() + [units.numel()]
    return [b - a for a, b in zip(starts, starts[1:])]


class UnitVitRuntime(VitRuntime):
    """Bookkeeping and the block loop of a merge-unit tower for one compiled model."""

    extras = TowerExtras()

    def __init__(self, plan: Plan, num_heads: int, log: ForwardLog, visual: nn.Module, window: int):
        super().__init__(plan, num_heads, log)
        self.visual = visual
        self.unit = plan.spec.spatial_merge ** 2
        self.window = window  # merge units per window side (0: every block attends per image)
        self.full = set(plan.spec.vit_full_attention) if window else set(range(plan.spec.vit.layers))
        self.plans = PlanCache(plan)
        self.layers = visual.blocks
        self.kept_units: Tensor | None = None  # [G, k] raster unit index of each kept unit, for the LLM
        self.rope: tuple[Tensor, Tensor] | None = None  # cos / sin of the current patches [G, k, m², dh]
        self.cols = self.units = 0  # this call's merge-unit grid: columns, units per image
        self.static_windows: list[int] = []  # units per window of the unpruned image
        self.pruned = False
        # layers whose output a score reads (no projection)
        self.output_read = {o.layer for o in plan.observations
                            if o.tower == "vit" and not by_canonical(o.scorer).projections}

    # -------------------------------------------------------------- the tower
    def forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs: Any):
        """The tower's forward with the plan's stages between its blocks (module docstring)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        rows = torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
        if any(t != 1 for t, _, _ in rows):
            raise CompileError("ViT stages on a merge-unit tower take images (t = 1), not video")
        p, m = self.spec.patch_size, self.spec.spatial_merge
        plan = self.plans.for_sizes([(h * p, w * p) for _, h, w in rows])
        stages = {s.index: s for s in plan.stages if s.site.tower == "vit"}
        g, (_, h, w) = len(rows), rows[0]
        urows, self.cols = h // m, w // m
        self.units = urows * self.cols
        cpu_order = unit_order(urows, self.cols, self.window)
        # the unpruned windows, known without reading a tensor (a meta model runs too)
        self.static_windows = window_lengths(cpu_order, self.cols, self.window) if self.window else []
        order = cpu_order.to(hidden_states.device)
        x = self.extras.embed(self.visual.patch_embed(hidden_states), grid_thw)
        from transformers.vision_utils import get_vision_position_ids

        ids = get_vision_position_ids(torch.as_tensor(grid_thw).cpu(), m).to(x.device)
        cos, sin = self.visual.rotary_pos_emb(x, ids)
        x, cos, sin = (t.reshape(g, urows * self.cols, self.unit, -1)[:, order] for t in (x, cos, sin))
        self.reset()
        self.kept_units = None
        self.pruned = False  # no stage inside the tower yet this call
        self.tokens = Tokens(order[None].expand(g, -1) + 1, order[None].expand(g, -1), (urows, self.cols))
        self.feature_tokens = self.tokens
        self.rope = (cos, sin)
        for i, block in enumerate(self.layers):
            for stage in (s for s in stages.values() if s.site.layer == i):
                x = self._layer_stage(stage, x)
            x = self._block(i, block, x)
            self.extras.after_block(i, x, self.tokens)
        out = BaseModelOutputWithPooling(last_hidden_state=x.flatten(0, 2),
                                         pooler_output=self._features(x, stages, urows * self.cols))
        return self.extras.output(out, self.tokens, self.units)

    def _block(self, i: int, block: nn.Module, x: Tensor) -> Tensor:
        g, k, unit, d = x.shape
        if i in self.full:
            lengths = [k * unit] * g
        elif not self.pruned:
            lengths = [n * unit for n in self.static_windows] * g  # no stage yet: the image's own windows
        else:
            # each image kept its own units: its own windows
            lengths = [n * unit for units in self.tokens.vid - 1 for n in window_lengths(units, self.cols, self.window)]
        # on a meta model the segment lengths stay readable on the CPU, as the tower's own are
        cu = torch.tensor([0] + lengths, device="cpu" if x.is_meta else x.device).cumsum(0).to(torch.int32)
        cos, sin = (t.flatten(0, 2) for t in self.rope)
        out = block(x.flatten(0, 2), cu_seqlens=cu, max_seqlen=max(lengths),
                    position_embeddings=(cos, sin))
        out = out.view(g, k, unit, d)
        if i in self.output_read:
            self.captured.setdefault(i, {}).update(h=out.flatten(1, 2), tokens=self.tokens)
        return out

    def _layer_stage(self, stage: ResolvedStage, x: Tensor) -> Tensor:
        g, k, unit, d = x.shape
        key = f"{stage.site.text()}#{stage.index}"
        view = self._view(x.flatten(2), self.tokens)
        values, src, new = self._sorted(*self.log.run(key, stage, view))
        self.rope = tuple(ops.gather_tokens(t.flatten(2), src).view(g, -1, unit, t.shape[-1]) for t in self.rope)
        self.tokens = new
        self.feature_tokens = new
        self.pruned = True
        self.log.vit[key] = (k, values.shape[1])
        self.log.kept[key] = new.vid.sort(dim=1).values  # raster order, as the LLM's are logged
        return values.reshape(g, -1, unit, d)

    def _features(self, x: Tensor, stages: dict[int, ResolvedStage], units: int) -> Tensor:
        """The merger's tokens in raster order, `vit.out` stages on them, scattered back to
        one row per unit of the image (the dropped ones zero)."""
        g, k = x.shape[:2]
        merged = self.visual.merger(x.flatten(0, 2)).view(g, k, -1)
        raster = (self.tokens.vid - 1).argsort(dim=1)
        merged, tokens = ops.gather_tokens(merged, raster), self.tokens.take(raster)
        for stage in (s for s in stages.values() if s.site.layer is None):
            key = f"vit.out#{stage.index}"
            n_in = tokens.count
            merged, _src, tokens = self._sorted(*self.log.run(key, stage, self._view(merged, tokens)))
            self.log.vit[key] = (n_in, merged.shape[1])
            self.log.kept[key] = tokens.vid
        self.projector_tokens = tokens
        # scores only (no ViT stage): every unit reaches the LLM, nothing to remove there
        self.kept_units = tokens.vid - 1 if stages else None
        if self.kept_units is None:
            return merged.flatten(0, 1)
        full = merged.new_zeros(g, units, merged.shape[-1])
        full.scatter_(1, self.kept_units[..., None].expand(-1, -1, merged.shape[-1]), merged)
        return full.flatten(0, 1)

    def _view(self, x: Tensor, tokens: Tokens) -> StageView:
        view = StageView(x, tokens, lambda obs: self._aligned(obs, view.tokens.vid),
                         total_of=lambda obs: self.total_of(obs, x.shape[0]),
                         keys_of=lambda layer: self.keys_of(layer, view.tokens.vid))
        return view

    @staticmethod
    def _sorted(values: Tensor, src: Tensor, new: Tokens) -> tuple[Tensor, Tensor, Tokens]:
        """A stage's output in its inputs' order (contextual tokens of `merge rest` come
        last from `execute`): the tower's windows and the raster order stay runs."""
        perm = src.argsort(dim=1)
        return ops.gather_tokens(values, perm), src.gather(1, perm), new.take(perm)

    # -------------------------------------------------------------- scores
    def capture_qkv(self, layer: int, qkv: Tensor) -> None:
        """A block's fused q/k/v projection ``[N, 3·d]``: q and k with the block's rotary
        embedding applied, as its attention uses them, per image ``[G, n, d]``."""
        g, k, unit = self.rope[0].shape[:3]
        heads = self.num_heads
        q, key, v = qkv.view(g, k * unit, 3, heads, -1).unbind(2)
        cos, sin = (t.flatten(1, 2)[:, :, None].float() for t in self.rope)

        def rotated(t: Tensor) -> Tensor:
            half = t.shape[-1] // 2
            t = t.float()
            return (t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin).flatten(2)

        needs = self.needs.get(layer, ())
        for name, value in (("q", q), ("k", key), ("v", v)):
            if name in needs:
                self.capture(layer, name, value.flatten(2) if name == "v" else rotated(value))

    def observe(self, obs: Observation) -> Scored:
        """A score read in the tower, per patch, summed over each merge unit's patches."""
        done = self.scored.get(obs)
        if done is not None:
            return done
        cap = self.captured.get(obs.layer)
        if cap is None:
            raise CompileError(f"nothing was captured at vit.layer{obs.layer} for '{obs.scorer}'")
        tokens: Tokens = cap["tokens"]
        values = by_canonical(obs.scorer).kernel(ScoreContext(obs, cap, self.num_heads, lead=0, layer=self._layer))
        values = values.view(values.shape[0], tokens.count, self.unit).sum(-1)
        done = self.scored[obs] = Scored(values, tokens.vid, "vid", self.units + 1)
        return done

    def keys_of(self, layer: int, vid: Tensor) -> Tensor:
        """A layer's keys (head mean, rotary applied) per unit: the mean of its patches'."""
        cap = self.captured.get(layer, {})
        if "k" not in cap:
            raise CompileError(f"'by keys' found no keys captured at vit.layer{layer}")
        k, tokens = cap["k"], cap["tokens"]
        g = k.shape[0]
        keys = k.view(g, tokens.count, self.unit, self.num_heads, -1).mean((2, 3))
        where = torch.full((g, self.units + 1), -1, dtype=torch.long, device=k.device)
        where.scatter_(1, tokens.vid, torch.arange(tokens.count, device=k.device)[None].expand(g, -1))
        idx = where.gather(1, vid)
        if bool((idx < 0).any()):
            raise CompileError(f"'by keys': a token was not present at vit.layer{layer}")
        return ops.gather_tokens(keys, idx)


def install(installer: Installer, plan: Plan, log: ForwardLog) -> UnitVitRuntime:
    """Replace the tower's forward by `UnitVitRuntime.forward` and hook the fused q/k/v
    projections the plan's scores read."""
    spec = plan.spec
    encoder_path = spec.vit_layer_path.format(i=0).rpartition(".")[0].rpartition(".")[0]
    visual = installer.model.get_submodule(encoder_path)
    window = 0
    if spec.vit_window:
        window = int(spec.vit_window ** 0.5) // spec.spatial_merge
    rt = UnitVitRuntime(plan, spec.vit.heads, log, visual, window)
    rt.extras = installer.family.unit_tower_extras(plan, visual) or rt.extras
    inserted = [f"{s.site.text()}: keep or drop whole {spec.spatial_merge}x{spec.spatial_merge} units "
                f"({s.tokens_in} -> {s.tokens_out})" for s in plan.stages if s.site.tower == "vit"]
    installer.override(encoder_path, "forward", rt.forward, "method-override",
                       "block loop over the kept merge units (windows, cu_seqlens, rotary rows recomputed); "
                       + "; ".join(inserted) + "; features scattered back to the unpruned layout")
    installer.listing.mechanism["vit"] = "forward"
    for layer in sorted(rt.needs):
        if rt.needs[layer]:
            path = spec.vit_layer_path.format(i=layer) + ".attn.qkv"
            installer.hook(path, "post", lambda _m, _a, out, layer=layer: rt.capture_qkv(layer, out),
                           f"capture q, k (rotary applied) for the scores at vit.layer{layer}", eager=False)
    return rt
