"""LLM stages: reversible forward hooks on the decoder layers (no fx; see the package
docstring for why).

Prefill (the layer's cache is empty, or there is no cache):

- the pre-hook of layer 0 starts the per-prompt state: which rows are image tokens
  (recorded from `input_ids` by a pre-hook on `LlavaModel`) and the full-length
  position ids `LlamaModel` hands to every layer;
- the pre-hook of a stage layer K gathers the hidden states entering K to the kept rows
  (text rows always kept; each sample and each image selects its own tokens, all the
  same count);
- the pre-hook of every layer >= K replaces `position_embeddings` (cos, sin),
  `position_ids` and the 4-D `attention_mask` by their gather to the kept positions, so
  kept tokens keep their original RoPE positions and padding/causality (each layer
  gathers the ones it is handed: sliding-window and global layers differ in both);
- after a `renumber` stage the rows carry their own position ids instead (each kept row's
  position less the rows the stage removed before it), and the layers from there on get
  (cos, sin) recomputed by the model's rotary embedding at those ids.

`llm.layer0` stages cannot work per layer: transformers sizes the 4-D mask by layer 0's
cache, so they run in a pre-hook on the language model itself, shrinking its input
embeddings, 2-D mask and position ids (original positions) before the mask is built.

Decode (the layer's cache is not empty): the per-prompt state is found again through the
cache object (a weak map), and layers >= K get the mask's key columns gathered to
``[kept prefill positions] + [every position after the prompt]``; their caches are
shorter, positions stay absolute, less the rows every `renumber` stage before the
layer removed (the position ids and (cos, sin) a layer is handed are recomputed). Scores are
their `vtdsl.ops.scorers` entry's kernel on what was captured: `q_proj` / `k_proj` outputs
(RoPE and GQA handled by the kernel) or a layer's output.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..ir.plan import Observation, Plan, ResolvedStage
from ..ops.scorers import ScoreContext, by_canonical
from .families import family_of
from .layer_cache import bind_cache
from .layouts import PlanCache
from .runtime import CompileError, ForwardLog, Scored, StageView, Tokens, _align, evaluate_score
from .vit import VitRuntime


def _rows(t: Tensor, rows: Tensor) -> Tensor:
    """Gather dim 1 of ``[B or 1, N, ...]`` with ``rows [B, n]``."""
    return ops.gather_tokens(t.expand(rows.shape[0], *t.shape[1:]), rows)


def _prompt_mask(am: Any) -> bool:
    """Whether an LLM input mask is one `llm.layer0` stages can gather: 2-D padding, or the
    4-D masks per layer kind a multimodal model built before its LLM (bidirectional image
    blocks), None where a kind needs none."""
    if isinstance(am, dict):
        return all(m is None or isinstance(m, Tensor) and m.dim() == 4 for m in am.values())
    return isinstance(am, Tensor) and am.dim() == 2


def _keep_columns(am: Tensor | dict, keep: Tensor, *, rows: bool) -> Tensor | dict:
    """A 2-D mask's columns `keep` ``[B, n]``, or each 4-D mask of a dict gathered to those
    key columns (and query rows at prefill, `rows`); None entries (no mask) stay None."""
    if isinstance(am, dict):
        return {kind: None if m is None else _gather_mask(m, keep if rows else None, keep) for kind, m in am.items()}
    return am.gather(1, keep)


def _gather_mask(mask: Tensor, rows: Tensor | None, cols: Tensor) -> Tensor:
    """Gather a ``[B or 1, h, q, kv]`` mask to query rows and key columns (per sample)."""
    b = cols.shape[0]
    mask = mask.expand(b, *mask.shape[1:])
    h = mask.shape[1]
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], mask.shape[3]))
    return mask.gather(3, cols[:, None, None, :].expand(b, h, mask.shape[2], cols.shape[1]))


def _placement(st: LlmState, stage: ResolvedStage, img_rows: Tensor, src: Tensor,
               new: Tokens) -> tuple[Tensor, Tensor, Tensor, Tokens]:
    """Where a stage's output tokens go: the rows they occupy ``[B, images·k]``
    (ascending), the prompt position naming each row's token, the output token each row
    takes ``[B·images, k]`` and the tokens' identities in row order."""
    b = st.pos.shape[0]
    order = src.argsort(dim=1)
    chosen = img_rows.gather(1, src.gather(1, order)).view(b, -1)
    if stage.rest is not None and stage.rest.appends:
        # the output order is the sequence order: the image's slots (its chosen rows,
        # ascending) take the tokens as the option returns them, identities with them
        ident = st.pos.gather(1, img_rows.gather(1, src).view(b, -1))
        return chosen, ident, torch.arange(src.shape[1], device=src.device).expand_as(src), new
    return chosen, st.pos.gather(1, chosen), order, new.take(order)


def _frame_layout(img: Tensor, vtok: Tokens, b: int, groups: int) -> tuple[Tensor, Tensor]:
    """``[B, n0]`` frame and in-frame position of each prompt position from the videos'
    token layout (`vtok`: crop = temporal group, gpos = position in it); a sample's second
    video continues the frame count; -1 on text."""
    crop = vtok.crop.reshape(b, -1)
    per_video = vtok.crop.shape[1]
    video = torch.arange(crop.shape[1], device=crop.device) // per_video
    frame = torch.full(img.shape, -1, dtype=torch.long, device=img.device)
    pos = torch.full(img.shape, -1, dtype=torch.long, device=img.device)
    return (frame.masked_scatter(img, crop + video * groups), pos.masked_scatter(img, vtok.gpos.reshape(b, -1)))


def _frames_at(st: LlmState, pos: Tensor) -> dict[str, Tensor]:
    """`ScoreContext`'s frame fields for the rows at prompt positions `pos` ``[B, n]``."""
    if st.frames is None:
        return {}
    return {"frame": st.frames[0].gather(1, pos), "frame_pos": st.frames[1].gather(1, pos)}


@dataclass
class LlmState:
    """One prompt (batch) from prefill through its decode steps.

    Two coordinate systems: `pos` indexes the full prompt (what scores, logs and labels
    use); `rows` indexes the sequence the decoder layers were handed (the full prompt,
    or the prompt after `llm.layer0` stages, which run before the LLM builds its mask).
    """

    n0: int  # prompt length
    pos: Tensor  # [B, n] prompt position of each current row
    is_img: Tensor  # [B, n] bool
    images: int  # images per sample
    per_image: int  # visual tokens per image now
    vtok: Tokens  # [B*images, per_image]
    nb: int = 0  # length of the sequence handed to the layers
    rows: Tensor | None = None  # [B, n] index of each current row in that sequence
    base_pos: Tensor | None = None  # [B, nb] prompt positions kept by llm.layer0 stages
    full_pid: Tensor | None = None
    pruned: bool = False  # rows != arange(nb)
    # `renumber`: the position ids of the current rows once a stage re-numbered them
    # (None: the positions of the sequence handed to the layers, gathered at `rows`);
    # `shift`: rows removed by re-numbering stages so far, `input_shift` the part of it
    # removed before the LLM built its positions (llm.layer0); `layer_shift[j]`: what
    # layer j subtracts from the position ids it is handed while decoding.
    pid: Tensor | None = None
    prompt_pid: Tensor | None = None
    shift: int = 0
    input_shift: int = 0
    layer_shift: dict[int, int] = field(default_factory=dict)
    # the layers' inputs gathered to `rows`, per (mask, rotary) pair handed to them
    gathered: dict[tuple[int, int], dict[str, Any]] | None = None
    layer_rows: dict[int, Tensor] = field(default_factory=dict)
    ctx: dict[int, dict[str, Any]] = field(default_factory=dict)
    captured: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    scored: dict[Observation, Scored] = field(default_factory=dict)
    # the stages as resolved for this prompt's image size, by stage index
    stages: dict[int, ResolvedStage] = field(default_factory=dict)
    # `text(raters)`: [B, n0] the prompt positions of SparseVLM's raters
    raters: Tensor | None = None
    is_pad: Tensor | None = None  # [B, n0] padding positions of the prompt (2-D mask zeros)
    # a video's layout: [B, n0] frame and in-frame position of each prompt position (-1: text)
    frames: tuple[Tensor, Tensor] | None = None


class LlmRuntime:
    def __init__(
        self,
        plan: Plan,
        vit: VitRuntime | None,
        log: ForwardLog,
        *,
        image_token_id: int,
        video_token_id: int | None = None,
        num_heads: int,
        num_kv_heads: int,
        scaling: float,
        rotary: nn.Module | None = None,
        plans: PlanCache | None = None,
        norm_weight: Tensor | None = None,
    ):
        self.plan = plan
        self.plans = plans if plans is not None else PlanCache(plan)
        self.spec = plan.spec
        self.family = family_of(plan.spec)  # the token layout the LLM receives
        self.vit = vit
        self.log = log
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id  # a video's placeholder (families that take video)
        self.num_heads, self.num_kv_heads, self.scaling = num_heads, num_kv_heads, scaling
        self.rotary = rotary  # the LLM's rotary embedding: (cos, sin) of re-numbered positions
        self.norm_weight = norm_weight  # the LLM's final norm weight (far(norm))
        if rotary is None and any(s.renumber for s in plan.stages):
            raise CompileError("'renumber' needs the language model's rotary embedding module")
        self.stages_at: dict[int, list[ResolvedStage]] = {}
        for s in plan.stages:
            if s.site.tower == "llm":
                self.stages_at.setdefault(s.site.layer, []).append(s)
        self.last_stage_layer = max(self.stages_at) if self.stages_at else -1
        llm_obs = [o for o in plan.observations if o.tower == "llm"]
        # scores read on a layer's input, before its stage: computed by `_observe_input`
        self.input_obs_at: dict[int, list[Observation]] = {}
        for o in llm_obs:
            if o.on_input:
                self.input_obs_at.setdefault(o.layer, []).append(o)
        # one query row suffices when every score at that layer reads the last text token
        self.input_last_only = {j: all(o.queries == "last_text" for o in obs) for j, obs in self.input_obs_at.items()}
        self.input_layers: dict[int, nn.Module] = {}  # filled by the installer
        self.layers: dict[int, nn.Module] = {}  # every decoder layer, recorded by its pre-hook
        self.needs_raters = any(o.queries == "raters" for o in llm_obs)
        self.observations = [o for o in llm_obs if not o.on_input]
        self.observed = {o.layer for o in self.observations}
        self.attn_obs_at: dict[int, list[Observation]] = {}
        for o in self.observations:
            if by_canonical(o.scorer).projections:
                self.attn_obs_at.setdefault(o.layer, []).append(o)
        self.by_cache: "weakref.WeakKeyDictionary[Any, LlmState]" = weakref.WeakKeyDictionary()
        self.state: LlmState | None = None
        self.pending: LlmState | None = None  # started by the LLM-input hook, not yet by layer 0
        self.image_mask: Tensor | None = None
        self.video_mask: Tensor | None = None
        self.attention_mask: Tensor | None = None
        self.prefill = False

    # ------------------------------------------------------------------ hooks
    def llava_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # the 2-D mask, read at prefill for its padding rows (never text pivots or raters)
        self.attention_mask = kwargs.get("attention_mask")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")

        def rows_of(token_id: int | None) -> Tensor | None:
            if token_id is None or (input_ids is None and embeds is None):
                return None
            if input_ids is not None:
                return input_ids == token_id
            token = torch.full((), token_id, dtype=torch.long, device=embeds.device)
            return (embeds == module.get_input_embeddings()(token)).all(-1)

        self.image_mask, self.video_mask = rows_of(self.image_token_id), rows_of(self.video_token_id)
        return None

    def _visual_rows(self, b: int, n0: int, device) -> tuple[Tensor, Plan]:
        """``[B, n0]`` the prompt's visual placeholders and the plan they run under: the
        image's (`image_token_id`) or, on a prompt holding a video's, the video's."""
        img = self.image_mask
        if img is None or tuple(img.shape) != (b, n0):
            img = torch.zeros(b, n0, dtype=torch.bool, device=device)
        plan = self.plans.current or self.plan  # counts for this call's images
        vid = self.video_mask
        if vid is not None and tuple(vid.shape) == (b, n0) and bool(vid.any()):
            if bool(img.any()):
                raise CompileError("LLM stages take one kind of visual input per call; this prompt holds image "
                                   "and video placeholders: pass them in separate calls")
            if self.plans.video is None:
                raise CompileError("the prompt holds video placeholders but no video was encoded in this call "
                                   "(pass pixel_values_videos and video_grid_thw)")
            img, plan = vid, self.plans.video
        return img.to(device), plan

    def llm_input_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """`llm.layer0` stages, on the language model's input (before it builds its mask).

        Prefill: the embeddings, the 2-D attention mask and the position ids are gathered
        to the kept prompt positions, so transformers builds mask and RoPE for the
        shorter sequence at the original positions. Decode: the 2-D mask's prompt columns
        are gathered the same way; missing position ids are made absolute.
        """
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        # a stage here runs before any layer's pre-hook: a score's kernel finds the layers here
        self.layers.update(enumerate(getattr(module, "layers", ())))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        am = kwargs.get("attention_mask")
        if am is not None and not _prompt_mask(am):
            raise CompileError("llm.layer0 stages need a 2-D attention mask, none, or a dict of full-length 4-D masks")
        kwargs = dict(kwargs)
        b, q = embeds.shape[:2]
        if cache is None or cache.get_seq_length(0) == 0:
            self.pending = None
            st = self._start(embeds, cache)
            pid = kwargs.get("position_ids")
            if pid is None:
                pid = torch.arange(st.n0, device=embeds.device)[None]
            if pid.dim() == 2:
                st.prompt_pid = pid.expand(b, -1)
            if st.images:
                surplus = self.vit.surplus if self.vit is not None else 0
                if surplus:
                    embeds = self._trim(st, embeds, surplus)
                if getattr(self.vit, "kept_units", None) is not None:
                    embeds = self._keep_units(st, embeds)
                for stage in self.stages_at.get(0, ()):
                    embeds = self._run_stage(st, stage, embeds)
            keep = st.pos
            st.base_pos = keep
            self.pending = st
            kwargs["inputs_embeds"] = embeds
            if am is not None:
                kwargs["attention_mask"] = _keep_columns(am, keep, rows=True)
            else:
                # without a mask (and a cache) transformers reads gaps in the position ids as
                # packed sequences and blocks attention across them: say "one sequence"
                kwargs["attention_mask"] = torch.ones(keep.shape, dtype=torch.long, device=embeds.device)
            if st.pid is not None:
                kwargs["position_ids"] = st.pid
            elif pid.dim() == 3:  # M-RoPE: [streams, B, N], every stream gathered alike
                kwargs["position_ids"] = pid.expand(-1, b, -1).gather(2, keep[None].expand(pid.shape[0], -1, -1))
            else:
                kwargs["position_ids"] = _rows(pid, keep)
            st.input_shift = st.shift
            return args, kwargs
        st = self.by_cache.get(cache)
        if st is None or st.base_pos is None:
            return None
        past = cache.get_seq_length(0) - st.base_pos.shape[1]  # tokens decoded so far
        widths = ([m.shape[-1] for m in am.values() if m is not None] if isinstance(am, dict)
                  else [am.shape[1]] if am is not None else [])
        if widths:
            width = widths[0]
            tail = torch.arange(st.n0, width, device=st.base_pos.device)[None].expand(b, -1)
            kwargs["attention_mask"] = _keep_columns(am, torch.cat([st.base_pos, tail], dim=1), rows=False)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = (st.n0 + past + torch.arange(q, device=embeds.device))[None].expand(b, -1)
        if st.input_shift:
            kwargs["position_ids"] = kwargs["position_ids"] - st.input_shift
        return args, kwargs

    def layer_pre_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            out = self._layer_pre(j, module, args, kwargs)
            return bind_cache(j, module, *(out or (args, kwargs)))

        return hook

    def _layer_pre(self, j: int, module: nn.Module, args: tuple, kwargs: dict):
        self.layers[j] = module  # a score's kernel may read the layer's modules (its input norm)
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length(j) == 0
        if prefill:
            return self._prefill(j, hidden, args, kwargs, cache)
        self.prefill = False
        st = self.by_cache.get(cache)
        if st is None:
            return None
        if j not in st.layer_rows:
            return self._windowed(j, args, kwargs, cache, hidden.shape[1])
        kwargs = dict(kwargs)
        shift = st.layer_shift.get(j, 0)
        if shift:
            pid = kwargs.get("position_ids")
            if pid is None:
                raise CompileError(f"layer {j}: 'renumber' needs the position ids the layers are handed")
            pid = pid - shift
            kwargs["position_ids"] = pid
            kwargs["position_embeddings"] = self._rope_at(kwargs.get("position_embeddings"), pid, j)
        mask = kwargs.get("attention_mask")
        if mask is None:
            return args, kwargs
        if not isinstance(mask, Tensor) or mask.dim() != 4:
            raise CompileError(f"LLM stages need a 4-D tensor attention mask, got {type(mask).__name__}")
        kept = st.layer_rows[j]
        tail = torch.arange(st.nb, mask.shape[-1], device=kept.device)[None].expand(kept.shape[0], -1)
        cols = torch.cat([kept, tail], dim=1)
        q = hidden.shape[1]
        if cache.get_seq_length(j) + q != cols.shape[1]:
            raise CompileError(
                f"layer {j}: cache holds {cache.get_seq_length(j)} tokens but the pruned mask "
                f"expects {cols.shape[1] - q}"
            )
        # a sliding-window layer's cache holds only its last rows: the mask's last columns
        # (a window over original positions, which the full-length mask carries)
        kv = cache.get_mask_sizes(q, j)[0]
        kwargs["attention_mask"] = _gather_mask(mask, None, cols[:, -kv:] if kv < cols.shape[1] else cols)
        return args, kwargs

    @staticmethod
    def _windowed(j: int, args: tuple, kwargs: dict, cache, q: int):
        """Decoding after an llm.layer0 stage, at a layer no later stage pruned: the mask the
        LLM input hook gathered (prompt rows kept, full length), cut to the last columns a
        sliding-window layer's cache still holds; other layers keep it as it is."""
        mask = kwargs.get("attention_mask")
        kv = cache.get_mask_sizes(q, j)[0]
        if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[-1] <= kv:
            return None
        return args, {**kwargs, "attention_mask": mask[..., -kv:]}

    def layer_post_hook(self, j: int):
        def hook(module: nn.Module, args: tuple, output):
            if self.prefill and self.state is not None:
                h = output[0] if isinstance(output, tuple) else output
                self.state.captured.setdefault(j, {})["h"] = h
            return None

        return hook

    def proj_hook(self, j: int, key: str):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            if self.prefill and self.state is not None:
                slot = self.state.captured.setdefault(j, {})
                slot[key] = output
                if "q" in slot and "k" in slot:
                    self._score_now(self.state, j)
            return None

        return hook

    def _score_now(self, st: LlmState, j: int) -> None:
        """Score layer j's attention observations as soon as its q and k are captured and
        let the projections go: holding two ``[B, n, H·dh]`` tensors until the stage
        layer would raise the prefill's peak memory (benchmarks/README.md)."""
        if j not in st.ctx or not st.images:
            return  # nothing recorded for this layer, or no image: no stage reads a score
        for obs in self.attn_obs_at.get(j, ()):
            self._observe(st, obs)
        slot = st.captured[j]
        slot.pop("q", None)
        slot.pop("k", None)

    def prompt_rows(self, hidden: Tensor) -> tuple[Tensor, Tensor] | None:
        """During prefill, for hidden states `hidden` between two layers: the prompt
        position ``[B, n]`` each of its rows holds and whether the row is a visual token,
        once stages removed rows; None while the rows are still the prompt's own."""
        st = self.state
        if not self.prefill or st is None or st.pos.shape[1] == st.n0 or hidden.shape[1] != st.pos.shape[1]:
            return None
        return st.pos, st.is_img

    # ------------------------------------------------------------------ prefill
    def _start(self, hidden: Tensor, cache) -> LlmState:
        b, n0 = hidden.shape[:2]
        img, plan = self._visual_rows(b, n0, hidden.device)
        counts = img.sum(1)
        spec = plan.spec
        per_image = plan.image_placeholders
        total = int(counts[0]) if b else 0
        if bool((counts != total).any()):
            raise CompileError(
                f"LLM stages need the same number of image tokens in every sample, got {counts.tolist()}"
            )
        if total and (per_image == 0 or total % per_image):
            raise CompileError(f"{total} image tokens per sample is not a multiple of {per_image} per image"
                               + (f" (the count of a {spec.name} image of the size passed)" if plan is not self.plan
                                  else ""))
        images = total // per_image if per_image else 0
        g = b * images
        vtok = self.family.llm_tokens(spec, g, per_image, hidden.device,
                                      self.vit.projector_tokens if self.vit is not None else None,
                                      intact=plan.projector_tokens == spec.projector_tokens)
        if cache is not None and self.stages_at:
            from transformers.cache_utils import DynamicCache

            if not isinstance(cache, DynamicCache):
                raise CompileError(
                    f"LLM stages give layers different cache lengths; {type(cache).__name__} "
                    "cannot hold that (use the default DynamicCache)"
                )
        st = LlmState(
            n0=n0,
            pos=torch.arange(n0, device=hidden.device)[None].expand(b, -1),
            is_img=img,
            images=images,
            per_image=per_image if images else 0,
            vtok=vtok,
            stages={s.index: s for s in plan.stages},
        )
        am = self.attention_mask
        if spec.video_frames and images:
            st.frames = _frame_layout(img, vtok, b, spec.vit_crops)
        st.is_pad = ((am == 0).to(hidden.device) if isinstance(am, Tensor) and tuple(am.shape) == (b, n0)
                     else torch.zeros(b, n0, dtype=torch.bool, device=hidden.device))
        st.captured[-1] = {"h": hidden}
        st.ctx[-1] = {"pos": st.pos, "is_img": st.is_img}
        self.state = st
        return st

    def _prefill(self, j: int, hidden: Tensor, args: tuple, kwargs: dict, cache):
        self.prefill = True
        if j == 0:
            st, self.pending = self.pending, None
            if st is None:
                st = self._start(hidden, cache)
            if cache is not None:
                self.by_cache[cache] = st
            st.nb = hidden.shape[1]
            st.rows = torch.arange(st.nb, device=hidden.device)[None].expand(hidden.shape[0], -1)
            st.full_pid = kwargs.get("position_ids")
            if self.needs_raters and st.images:
                self._raters(st, hidden)
        else:
            st = self.state
        if st is None or st.rows is None:
            return None
        changed = False
        if st.images and j in self.input_obs_at:
            self._observe_input(st, j, hidden, self._gathered_for(st, kwargs, j) if st.pruned else kwargs)
        if st.images and j > 0:
            for stage in self.stages_at.get(j, ()):
                hidden = self._run_stage(st, stage, hidden)
                changed = True
        if st.pruned:
            if changed:
                st.gathered = None
            kwargs = dict(kwargs)
            kwargs.update(self._gathered_for(st, kwargs, j))
            st.layer_rows[j] = st.rows
            st.layer_shift[j] = st.shift - st.input_shift
        if j in self.observed:
            st.ctx[j] = {
                "pe": kwargs.get("position_embeddings"),
                "mask": kwargs.get("attention_mask"),
                "pos": st.pos,
                "is_img": st.is_img,
            }
        if j == max(self.last_stage_layer, 0):  # no later stage reads what was captured
            st.captured.clear()
            st.scored.clear()
        if not changed and not st.pruned:
            return None
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _gathered_for(self, st: LlmState, kwargs: dict, j: int) -> dict[str, Any]:
        """The layer's own position embeddings and mask gathered to the kept rows, once per
        pair of objects: layers may be handed different ones (sliding-window and global
        layers with their own masks and rotary bases)."""
        mask, pe = kwargs.get("attention_mask"), kwargs.get("position_embeddings")
        key = (id(mask), id(pe[0]) if isinstance(pe, tuple) else id(pe))
        if st.gathered is None:
            st.gathered = {}
        if key not in st.gathered:
            st.gathered[key] = self._gathered(st, mask, pe, j)
        return st.gathered[key]

    def _gathered(self, st: LlmState, mask: Any, pe: tuple[Tensor, Tensor] | None, j: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if st.pid is not None and st.shift > st.input_shift:
            # re-numbered rows: positions no row had in the sequence the LLM handed over
            out["position_ids"] = st.pid
            out["position_embeddings"] = self._rope_at(pe, st.pid, j)
        else:
            if pe is not None:
                cos, sin = pe
                out["position_embeddings"] = (_rows(cos, st.rows), _rows(sin, st.rows))
            if st.full_pid is not None:
                out["position_ids"] = _rows(st.full_pid, st.rows)
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 4:
                raise CompileError(f"LLM stages need a 4-D tensor attention mask, got {type(mask).__name__}")
            out["attention_mask"] = _gather_mask(mask, st.rows, st.rows)
        return out

    def _rope_at(self, like: tuple[Tensor, Tensor] | None, pid: Tensor, j: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) of the LLM's rotary embedding at position ids `pid` ``[B, n]`` for
        layer j, in the dtype and device of the (cos, sin) the layers were handed (`like`).
        A rotary embedding with one base per layer kind (sliding-window, global) is asked
        for layer j's kind, its attention's `layer_type`."""
        if like is None:
            raise CompileError("'renumber' needs the position embeddings the layers are handed")
        import inspect

        args = (like[0], pid.to(like[0].device))
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:
            args += (self.layers[j].self_attn.layer_type,)
        return self.rotary(*args)

    def _positions(self, st: LlmState) -> Tensor:
        """Position ids ``[B, n]`` of the current rows."""
        if st.pid is not None:
            return st.pid
        if st.rows is None:  # an llm.layer0 stage, on the prompt itself
            return st.prompt_pid.gather(1, st.pos)
        if st.full_pid is not None:
            return _rows(st.full_pid, st.rows)
        return st.rows

    def _trim(self, st: LlmState, embeds: Tensor, surplus: int) -> Tensor:
        """Remove the `surplus` padding rows ending each image's placeholders (each crop's,
        on anyres models): an adaptive ViT count kept fewer tokens than the prompt has
        room for (`VitRuntime.pad_features`). The rows after them move up (contiguous
        positions), as if the prompt had held exactly the kept tokens."""
        b, n = embeds.shape[:2]
        per = st.per_image
        plan = self.plans.current or self.plan
        blocks = plan.spec.vit_crops  # the image's crops, each padded to the same room
        room = per // blocks
        img_rows = st.is_img.nonzero()[:, 1].view(b, st.images, blocks, room)
        keep = torch.ones_like(st.is_img)
        keep.scatter_(1, img_rows[..., room - surplus:].reshape(b, -1), False)
        rows = keep.nonzero()[:, 1].view(b, -1)
        pid = self._positions(st).gather(1, rows)
        st.pid = pid - (rows - torch.arange(rows.shape[1], device=rows.device))
        st.shift += n - rows.shape[1]
        st.pos = st.pos.gather(1, rows)
        st.is_img = st.is_img.gather(1, rows)
        st.per_image = per - blocks * surplus
        st.vtok = self.family.trimmed_tokens(plan.spec, st.vtok, b * st.images, st.per_image, embeds.device)
        return ops.gather_tokens(embeds, rows)

    def _keep_units(self, st: LlmState, embeds: Tensor) -> Tensor:
        """Keep the rows of the merge units the tower kept (`vtdsl.compiler.merge_units`:
        it hands on one row per unit of the image), at their own positions, as an
        llm.layer0 stage keeps rows."""
        kept = self.vit.kept_units
        b, per = embeds.shape[0], st.per_image
        if kept.shape[0] != b * st.images:
            kept = kept.repeat_interleave(b * st.images // max(kept.shape[0], 1), 0)
        img_rows = st.is_img.nonzero()[:, 1].view(b * st.images, per)
        chosen = img_rows.gather(1, kept).view(b, -1)
        rows = (~st.is_img).scatter(1, chosen, True).nonzero()[:, 1].view(b, -1)
        if st.pid is not None:
            st.pid = st.pid.gather(1, rows)
        st.pos = st.pos.gather(1, rows)
        st.is_img = st.is_img.gather(1, rows)
        st.per_image = kept.shape[1]
        st.vtok = self.vit.projector_tokens.expand_to(b * st.images)
        return ops.gather_tokens(embeds, rows)

    def _run_stage(self, st: LlmState, stage: ResolvedStage, hidden: Tensor) -> Tensor:
        stage = st.stages.get(stage.index, stage)
        b, n, d = hidden.shape
        k_in = st.per_image
        img_rows = st.is_img.nonzero()[:, 1].view(b, st.images * k_in)
        x_img = ops.gather_tokens(hidden, img_rows).reshape(b * st.images, k_in, d)
        img_pos = st.pos.gather(1, img_rows)

        def score_of(obs: Observation) -> Tensor:
            if obs.tower == "vit":
                if self.vit is None:
                    raise CompileError("a ViT score was requested but the ViT is not instrumented")
                return _align(self.vit.observe(obs), view.tokens.vid)
            return _align(self._observe(st, obs), img_pos).view(b * st.images, k_in)

        def text_pivots(score, m: int) -> Tensor:
            # the m text rows that `score` ranks highest among those after the sample's last
            # image token (the question); a prompt with fewer there takes the rest from the
            # best-scored text rows before the image
            def row_score(obs: Observation) -> Tensor:
                if obs.tower == "vit":
                    raise CompileError("text pivots are ranked by an LLM score")
                return _align(self._observe(st, obs), st.pos)

            values = evaluate_score(score, StageView(hidden, st.vtok, row_score)).float()
            values = torch.nan_to_num(values, nan=float("-inf"))
            idx = torch.arange(n, device=hidden.device)
            last_img = torch.where(st.is_img, idx[None], -1).amax(1)
            after = idx[None] > last_img[:, None]
            text = ~st.is_img & ~st.is_pad.gather(1, st.pos)
            have = int(text.sum(1).min())
            if have < m:
                raise CompileError(f"'far' asks for {m} text pivots, but a prompt has only {have} text tokens")
            by_score = values.argsort(dim=1, descending=True, stable=True)
            rank = (text & after).gather(1, by_score).long() * 2 + text.gather(1, by_score).long()
            order = by_score.gather(1, rank.argsort(dim=1, descending=True, stable=True))
            rows = order[:, :m]  # best first: DART inserts them in its set in topk order
            feats = ops.gather_tokens(hidden, rows).repeat_interleave(st.images, 0)
            return feats, st.pos.gather(1, rows).repeat_interleave(st.images, 0)

        def total_of(obs: Observation) -> Tensor | None:
            return self.vit.total_of(obs, b * st.images) if obs.tower == "vit" and self.vit is not None else None

        view = StageView(x_img, st.vtok, score_of, text_pivots, total_of, self.norm_weight,
                         seq_pos=img_pos.view(b * st.images, k_in))
        values, src, new = self.log.run(f"{stage.site.text()}#{stage.index}", stage, view)
        k_out = src.shape[1]
        chosen, ident, order, new = _placement(st, stage, img_rows.view(b * st.images, k_in), src, new)
        keep = ~st.is_img
        keep = keep.scatter(1, chosen, True)
        rows = keep.nonzero()[:, 1].view(b, -1)
        out = ops.gather_tokens(hidden, rows)
        if not stage.copies_rows:
            # merged / pooled vectors replace the rows whose identity they take; `rows` and
            # `chosen` are both ascending, so each chosen row's slot is a sorted search
            slot = torch.searchsorted(rows, chosen)
            values = ops.gather_tokens(values, order).reshape(b, -1, d).to(out.dtype)
            out.scatter_(1, slot[..., None].expand(-1, -1, d), values)
        self.log.llm[f"{stage.site.text()}#{stage.index}"] = (k_in, k_out)
        self.log.kept[f"{stage.site.text()}#{stage.index}"] = ident.sort(dim=1).values
        if stage.renumber or st.pid is not None:
            pid = self._positions(st).gather(1, rows)
            if stage.renumber:
                # each kept row moves up by the rows removed before it: contiguous again
                pid = pid - (rows - torch.arange(rows.shape[1], device=rows.device))
                st.shift += n - rows.shape[1]
            st.pid = pid
        st.pos = st.pos.gather(1, rows).scatter(1, torch.searchsorted(rows, chosen), ident)
        if st.rows is not None:
            st.rows = st.rows.gather(1, rows)
            st.pruned = True
        st.is_img = st.is_img.gather(1, rows)
        st.per_image = k_out
        st.vtok = new
        return out

    # ------------------------------------------------------------------ scores
    def _raters(self, st: LlmState, hidden: Tensor) -> None:
        """SparseVLM's raters from the tokens entering layer 0: the text after the last
        image token (all text when there is none) rated by the visual tokens."""
        b = hidden.shape[0]
        img_rows = st.is_img.nonzero()[:, 1].view(b, -1)
        txt_rows = (~st.is_img).nonzero()[:, 1].view(b, -1)
        real = ~st.is_pad.gather(1, st.pos.gather(1, txt_rows))
        after = (txt_rows > img_rows[:, -1:]) & real
        candidates = torch.where(after.any(1, keepdim=True), after, real)
        chosen = ops.text_raters(ops.gather_tokens(hidden, img_rows), ops.gather_tokens(hidden, txt_rows), candidates)
        st.raters = torch.zeros(b, st.n0, dtype=torch.bool, device=hidden.device)
        st.raters.scatter_(1, st.pos.gather(1, txt_rows), chosen)

    def _observe_input(self, st: LlmState, j: int, hidden: Tensor, current: dict) -> None:
        """Score layer j on its input (PyramidDrop): its input norm and q/k projections
        applied to the tokens entering it, before its stage chooses among them. Only the
        query rows a score needs are projected; `current` holds the position embeddings
        and mask of the tokens entering j."""
        layer = self.input_layers[j]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        key = ("in", j)
        q, k = attn.q_proj(x[:, -1:] if self.input_last_only[j] else x), attn.k_proj(x)
        if hasattr(attn, "q_norm"):  # per-head q/k norms before RoPE (Qwen3)
            dh = q.shape[-1] // self.num_heads
            q = attn.q_norm(q.unflatten(-1, (-1, dh))).flatten(-2)
            k = attn.k_norm(k.unflatten(-1, (-1, dh))).flatten(-2)
        st.captured[key] = {"q": q, "k": k}
        st.ctx[key] = {"pe": current.get("position_embeddings"), "mask": current.get("attention_mask"),
                       "pos": st.pos, "is_img": st.is_img}
        for obs in self.input_obs_at[j]:
            self._observe(st, obs)
        del st.captured[key]

    def _observe(self, st: LlmState, obs: Observation) -> Scored:
        done = st.scored.get(obs)
        if done is not None:
            return done
        slot = ("in", obs.layer) if obs.on_input else obs.layer
        ctx = st.ctx.get(slot)
        if ctx is None:
            raise CompileError(f"nothing was observed at llm.layer{obs.layer}")
        info = by_canonical(obs.scorer)
        if "llm" not in info.towers or info.kernel is None:
            raise CompileError(f"scorer '{obs.scorer}' ({obs.queries}) cannot be read in the LLM")
        raters = None
        if obs.queries == "raters":
            if st.raters is None:
                raise CompileError("'text(raters)' found no raters: they are chosen at the LLM's first layer")
            raters = st.raters.gather(1, ctx["pos"])
        values = info.kernel(ScoreContext(
            obs, st.captured.get(slot, {}), self.num_heads, kv_heads=self.num_kv_heads, layer=self._layer,
            position_embeddings=ctx.get("pe"), mask=ctx.get("mask"), is_img=ctx["is_img"], raters=raters,
            scaling=self.scaling, **_frames_at(st, ctx["pos"])))
        done = st.scored[obs] = Scored(values, ctx["pos"], "pos", st.n0)
        return done

    def _layer(self, i: int) -> nn.Module:
        layer = self.layers.get(i)
        if layer is None:
            raise CompileError(f"llm.layer{i} has not run: a score cannot read its modules")
        return layer
