"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): qwen3-vl-8b, tiny-qwen3-vl.

Qwen2-VL's layout (`qwen2_vl`: dynamic resolution, 2x2 merger, M-RoPE, `image_grid_thw`
per call) plus DeepStack: the text model adds one merged
ViT feature per visual token to the hidden states after each of its first layers
(`Qwen3VLTextModel._deepstack_process`, rows chosen by `visual_pos_masks`, a mask over the
prompt). Once an LLM stage removed rows, that mask and the features no longer match the
hidden states; the family replaces `_deepstack_process` so that each kept row gets the
feature of the prompt position it holds (merging or pooling stages there are refused at
check time: `vtdsl.ir.passes.infer_tokens`).

ViT stages run on merge units (`vtdsl.compiler.merge_units`), with two additions of this
tower (`DeepStackTower`): the learned position embeddings, interpolated to the image's
grid, are added before block 0 (the rotary positions follow the kept patches as on
Qwen2-VL), and the DeepStack mergers read, for the units the merger reads, each listed
block's output: blocks after a stage saw only the kept units, blocks before it all of them
(their rows gathered to the kept ones). Each feature goes back to its unit's row of the
unpruned layout, so the LLM input keeps the kept units' rows and `_deepstack_process`
adds each its own features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ... import ops
from ..runtime import CompileError, Tokens
from .base import TowerExtras
from .qwen2_vl import Qwen2VL

if TYPE_CHECKING:  # pragma: no cover
    from ...ir.plan import Plan
    from ..installer import Installer
    from ..llm import LlmRuntime


class Qwen3VL(Qwen2VL):
    """Full-attention ViT, 2x2 merger, interleaved M-RoPE, DeepStack injections."""

    name = "qwen3-vl"
    video_argument = None  # videos are not counted (`qwen3_layout`): a compiled model refuses them

    def install(self, installer: Installer, plan: Plan) -> None:
        """Refuse video calls under any stage or score: the LLM stages find visual tokens by
        the image placeholder, so a video's would pass through as text, unpruned."""
        if plan.stages or plan.observations:
            self.refuse_video(installer, plan, f"a compiled {plan.spec.name} takes image inputs only: its video "
                              "token counts are not modelled, so LLM stages would not see a video's tokens",
                              "refuse video inputs: LLM stages prune image placeholders only")

    def install_llm(self, installer: Installer, plan: Plan, runtime: LlmRuntime | None) -> None:
        if runtime is None or not plan.spec.deepstack_layers:
            return
        injected = plan.spec.deepstack_llm_layers
        if not any(s.site.tower == "vit" or s.site.layer <= injected[-1] for s in plan.stages):
            return  # every injection happens before the first stage: the rows are the prompt's
        path = self.language_model_path(plan.spec)
        original = installer.model.get_submodule(path)._deepstack_process

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            rows = runtime.prompt_rows(hidden_states)
            if rows is None:
                return original(hidden_states, visual_pos_masks, visual_embeds)
            pos, is_img = rows
            return _add_at_kept_rows(hidden_states, visual_pos_masks, visual_embeds, pos, is_img)

        installer.override(path, "_deepstack_process", deepstack_process, "method-override",
                           "DeepStack: add each kept visual token the ViT feature of its own prompt position "
                           f"(injections after llm.layer0..{injected[-1]}; stages before them removed rows)")

    def unit_tower_extras(self, plan: Plan, visual: nn.Module) -> TowerExtras | None:
        pools = [s.pool for s in plan.stages if s.site.tower == "vit" and s.site.layer is None and s.action == "pool"]
        return DeepStackTower(visual, plan.spec.spatial_merge, plan.spec.deepstack_layers, pools)


class DeepStackTower(TowerExtras):
    """Qwen3-VL's tower beyond Qwen2-VL's under ViT stages (module docstring)."""

    def __init__(self, visual: nn.Module, merge: int, layers: tuple[int, ...], pools: list[tuple[int, int]]):
        self.visual, self.merge, self.layers = visual, merge, layers
        self.pools = pools  # the (rows, cols) windows of the `pool` stages at vit.out, in order
        self.seen: dict[int, tuple[Tensor, Tensor]] = {}  # block -> (output [G, k, m², d], raster unit ids [G, k])

    def embed(self, x: Tensor, grid_thw: Tensor) -> Tensor:
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        self.seen = {}
        vis = self.visual
        # index arithmetic on the host: a meta model's grid cannot be read
        taps, weights = get_vision_interpolation_indices_and_weights(
            torch.as_tensor(grid_thw).cpu(), num_grid_per_side=vis.num_grid_per_side, mode=vis.interpolation_mode,
            align_corners=vis.interpolation_align_corners, spatial_merge_size=self.merge)
        taps, weights = taps.to(x.device), weights.to(x.device)
        return x + (vis.pos_embed(taps) * weights[:, :, None]).sum(1).to(x.dtype)

    def after_block(self, i: int, x: Tensor, tokens: Tokens) -> None:
        if i in self.layers:
            self.seen[i] = (x, tokens.vid - 1)

    def output(self, out, tokens: Tokens, units: int):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        kept = tokens.vid - 1
        g, k = kept.shape
        stacks = []
        for j, i in enumerate(self.layers):
            hidden, present = self.seen.pop(i)
            where = torch.zeros(g, units, dtype=torch.long, device=kept.device)
            where.scatter_(1, present, torch.arange(present.shape[1], device=kept.device).expand(g, -1))
            rows = ops.gather_tokens(hidden.flatten(2), where.gather(1, kept))  # the merger's units, [G, k, m²·d]
            stacks.append(self.visual.deepstack_merger_list[j](rows.flatten(0, 1)).view(g, k, -1))
        kept, stacks = self._pooled(kept, stacks, tokens.grid)
        features = []
        for merged in stacks:
            full = merged.new_zeros(g, units, merged.shape[-1])
            full.scatter_(1, kept[..., None].expand(-1, -1, merged.shape[-1]), merged)
            features.append(full.flatten(0, 1))
        return BaseModelOutputWithDeepstackFeatures(last_hidden_state=out.last_hidden_state,
                                                    pooler_output=out.pooler_output, deepstack_features=features)

    def _pooled(self, kept: Tensor, stacks: list[Tensor], grid: tuple[int, int]) -> tuple[Tensor, list[Tensor]]:
        """The DeepStack features pooled as `pool` at vit.out pools the merged tokens (a
        pooled token averages its window's features, linear as the merged ones), each
        under the unit whose identity the pooled token takes: its window's top-left."""
        for kr, kc in self.pools:
            rows, cols = grid
            if kept.shape[1] != rows * cols:
                raise CompileError(f"a pool at vit.out needs the {rows}x{cols} merge units, got {kept.shape[1]}")
            raster = kept.argsort(dim=1)
            kept = kept.gather(1, raster)
            stacks = [ops.pool2d(ops.gather_tokens(t, raster), grid, kr, kc) for t in stacks]
            prow, pcol = ops.pooled_grid(grid, kr, kc)
            r = torch.arange(prow, device=kept.device) * min(kr, rows)
            corner = (r[:, None] * cols + torch.arange(pcol, device=kept.device) * min(kc, cols)).flatten()
            kept, grid = kept[:, corner], (prow, pcol)
        return kept, stacks


def _add_at_kept_rows(hidden, mask, embeds, pos, is_img):
    """`hidden [B, n, d]` plus, at its visual rows, the DeepStack feature of the prompt
    position each row holds (`pos [B, n]`); `embeds` lists the features of the prompt's
    visual positions (`mask [B, n0]`) in row-major order, as transformers passes them."""
    b, n0 = mask.shape
    mask = mask.to(hidden.device)
    full = hidden.new_zeros(b, n0, hidden.shape[-1])
    full[mask] = embeds.to(hidden.device, hidden.dtype)
    feats = full.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
    out = hidden.clone()
    out[is_img] = hidden[is_img] + feats[is_img]
    return out


FAMILY = Qwen3VL()
