"""ViT stages on towers whose connector fuses fixed groups of patches after the tower
(`ModelSpec.merged_features`): InternVL3's 2x2 pixel shuffle, SmolVLM's s x s one, Gemma 3's
4x4 average pool. Each group (a merge unit) becomes one LLM token, so, as on Qwen-VL
(`vtdsl.compiler.merge_units`), a ViT stage keeps or drops whole units:

- the candidates of a stage at ``vit.layerN`` are the units of one tile (or view), each the
  concatenation of its `m²` patch rows (``[G, k, m²·d]``), identified by their raster index
  on the tile's merged grid (vid = index + 1); counts are in units, the LLM's tokens. CLS
  (InternViT's) is never a candidate and is always kept, as on every other tower;
- the first stage lays a tile's rows out unit by unit (each unit's patches in row-major
  order); the blocks after it attend over CLS and the kept units' patches. Both towers
  add their (absolute) positions before block 0 and attend without position terms, so
  the order of the rows changes nothing but which rows there are;
- scores read in the tower are per patch, summed over each unit's patches (CLS-free ones
  as on Qwen-VL; `cls` reads InternViT's CLS row); `by keys` takes a unit's mean key;
- after the last block (``vtdsl_vit_end``) the kept patches go back to their raster rows of
  the whole patch grid, the dropped units' rows zero, so that the model's own code after
  the encoder (SigLIP's post-norm, the pixel shuffle, the pool) runs unchanged. The
  shuffle and the pool fuse each unit's patches alone (no window straddles two units),
  so a kept unit's merged token is what the kept patches alone give and the zero rows
  reach only the dropped units' tokens; the projector's pre-hook keeps the kept units'
  tokens (raster order), then runs any `vit.out` stages on them. The projector and the
  LLM see the kept units only: the prompt holds one placeholder per kept unit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..ir.plan import Observation, Plan, ResolvedStage
from .runtime import CompileError, ForwardLog, Scored, StageView, Tokens, _align
from .vit import VitRuntime


def unit_patches(rows: int, cols: int, m: int) -> Tensor:
    """``[units, m²]``: the raster patch index of each unit's patches, units in raster
    order on the merged grid, each unit's patches row by row."""
    index = torch.arange(rows * cols).view(rows // m, m, cols // m, m).permute(0, 2, 1, 3)
    return index.reshape(-1, m * m)


class GroupVitRuntime(VitRuntime):
    """`VitRuntime` whose stages choose whole merge units (module docstring)."""

    def __init__(self, plan: Plan, num_heads: int, log: ForwardLog):
        super().__init__(plan, num_heads, log)
        self.unit = plan.spec.spatial_merge ** 2
        self.patches_of = unit_patches(*plan.spec.grid, plan.spec.spatial_merge)
        self.unit_count = self.patches_of.shape[0]

    def reset(self) -> None:
        super().reset()
        self.units: Tokens | None = None  # the units present in the tower now
        self.grouped = False  # rows laid out unit by unit (a stage ran this call)

    def _patches(self, device) -> Tensor:
        if self.patches_of.device != device:
            self.patches_of = self.patches_of.to(device)
        return self.patches_of

    # -------------------------------------------------------------- graph nodes
    def begin(self, x: Tensor) -> None:
        super().begin(x)
        self.units = Tokens.initial(x.shape[0], self.spec.llm_grid, x.device, False)
        self.captured[-1].update(units=self.units, grouped=False)

    def run_stage(self, stage: ResolvedStage, x: Tensor) -> Tensor:
        lead = 1 if self.has_cls else 0
        g, d = x.shape[0], x.shape[-1]
        body = x[:, lead:] if self.grouped else x[:, lead:][:, self._patches(x.device).flatten()]
        cand = body.reshape(g, -1, self.unit * d)
        if self.units is None or cand.shape[1] != self.units.count:
            raise CompileError("ViT merge-unit bookkeeping is out of step with the hidden states")
        view = StageView(cand, self.units, lambda obs: self._aligned(obs, view.tokens.vid),
                         total_of=lambda obs: self.total_of(obs, g),
                         keys_of=lambda layer: self.keys_of(layer, view.tokens.vid))
        key = f"{stage.site.text()}#{stage.index}"
        values, _src, new = self.log.run(key, stage, view)
        self.units, self.grouped = new, True
        patch_vid = self._patches(x.device)[new.vid - 1].flatten(1) + 1
        if lead:
            patch_vid = torch.cat([patch_vid.new_zeros(g, 1), patch_vid], 1)
        self.tokens = Tokens(patch_vid, patch_vid - 1, self.spec.grid)
        self.feature_tokens = self.tokens
        self.log.vit[key] = (cand.shape[1], values.shape[1])
        self.log.kept[key] = new.vid.sort(dim=1).values  # raster order, as the LLM's are logged
        return torch.cat([x[:, :lead], values.reshape(g, -1, d)], dim=1)

    def finish(self, x: Tensor) -> Tensor:
        """The last block's output with each kept unit's patches at their raster rows of the
        whole grid, the dropped units' rows zero (CLS first, as it was)."""
        if not self.grouped:
            return x
        lead = 1 if self.has_cls else 0
        g, d = x.shape[0], x.shape[-1]
        order = self.units.vid.argsort(dim=1)
        self.units = self.units.take(order)
        body = ops.gather_tokens(x[:, lead:].reshape(g, -1, self.unit * d), order)
        rows = self._patches(x.device)[self.units.vid - 1].flatten(1)
        full = x.new_zeros(g, self.spec.patch_tokens, d)
        full.scatter_(1, rows[..., None].expand(-1, -1, d), body.reshape(g, -1, d))
        return torch.cat([x[:, :lead], full], dim=1)

    def projector_input(self, x: Tensor) -> tuple[Tensor, Tokens]:
        """The shuffled or pooled tokens of the kept units (all of them when no stage ran
        in the tower), in raster order."""
        if x.shape[1] != self.unit_count:
            raise CompileError(f"the connector handed the projector {x.shape[1]} tokens per tile, not the "
                               f"{self.unit_count} merge units of the tile's grid")
        if not self.grouped:
            return x, Tokens.initial(x.shape[0], self.spec.llm_grid, x.device, False)
        return ops.gather_tokens(x, self.units.vid - 1), self.units

    # -------------------------------------------------------------- scores
    def capture(self, layer: int, key: str, value: Tensor) -> None:
        self.captured.setdefault(layer, {}).update(units=self.units, grouped=self.grouped)
        super().capture(layer, key, value)

    def scored_patches(self, values: Tensor, cap: dict) -> Scored:
        """Per merge unit: the per-patch values summed over each unit's patches present at
        the layer (the group's attention mass, its summed norm)."""
        per_unit, ids = self._per_unit(values, cap, lambda t: t.sum(-1))
        return Scored(per_unit, ids, "vid", self.unit_count + 1)

    def _per_unit(self, rows: Tensor, cap: dict, reduce) -> tuple[Tensor, Tensor]:
        """`reduce` over each unit's patch rows of ``rows`` [G, patches, ...] as the layer had
        them (raster before a stage, unit by unit after), with the units' vids."""
        g = rows.shape[0]
        if cap["grouped"]:
            return reduce(rows.reshape(g, -1, self.unit, *rows.shape[2:]).movedim(2, -1)), cap["units"].vid
        ids = torch.arange(1, self.unit_count + 1, device=rows.device)[None].expand(g, -1)
        return reduce(rows[:, self._patches(rows.device)].movedim(2, -1)), ids

    def keys_of(self, layer: int, vid: Tensor) -> Tensor:
        """``[G, n, dh]``: a unit's key at ViT `layer` (head mean, then the mean over its
        patches) for the units `vid`, which must have been present at that layer."""
        cap = self.captured.get(layer, {})
        if "k" not in cap:
            raise CompileError(f"'by keys' found no keys captured at vit.layer{layer}")
        k = cap["k"]
        g, lead = k.shape[0], 1 if self.has_cls else 0
        keys = k.view(g, k.shape[1], self.num_heads, -1).mean(2)[:, lead:]
        per_unit, present = self._per_unit(keys, cap, lambda t: t.mean(-1))
        where = torch.full((g, self.unit_count + 1), -1, dtype=torch.long, device=k.device)
        where.scatter_(1, present, torch.arange(present.shape[1], device=k.device)[None].expand(g, -1))
        idx = where.gather(1, vid)
        if bool((idx < 0).any()):
            raise CompileError(f"'by keys': a merge unit was not present at vit.layer{layer}")
        return ops.gather_tokens(per_unit, idx)

    def _aligned(self, obs: Observation, vid: Tensor) -> Tensor:
        if obs.tower != "vit":
            raise CompileError(f"a ViT stage cannot read the LLM observation at llm.layer{obs.layer}")
        return _align(self.observe(obs), vid)
