"""The installer: every rewrite of one model, listed and undone in one place.

`Installer(plan, model)` installs a checked plan in named steps (vision tower, features,
image sizes, LLM, prompt). Each step changes the model only through the installer's
primitives (`hook`, `swap`, `override`), which add a line to the listing and record the
undo, so `Compiled.remove` restores the original module tree whatever was installed. Like
a kvpress press, it is a context manager: `with Installer(plan, model):` installs on entry
and removes everything on exit, exception or not. The family (`vtdsl.compiler.families`)
answers what depends on the model family; the steps here never test spec fields for it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

from ..ir.plan import Plan, ResolvedStage
from ..lang.scorers import by_canonical
from .decode import install_decode
from .families import Family, family_of
from .generation import PromptGenerate
from .handle import ATTR, Compiled, compiled
from .inputs import maybe_rewrite
from .layouts import PlanCache
from .listing import Listing, stage_text
from .runtime import CompileError, ForwardLog

_MISSING = object()


def _eager(fn: Callable) -> Callable:
    """`fn` run by Python even inside `torch.compile` (the LLM's hooks). Traced, a layer's
    hook was specialised on its closure (the layer index) and on the per-prompt state
    (ints, shapes, `.item()`s) and recompiled for every layer until dynamo's recompile
    limit (tiny-llava, 2 LLM layers: 28 recompiles, 59 graphs, 20 s for a second
    generate); skipped, none of it is compiled (16 recompiles, 15 graphs, 0.1 s). Each
    layer is then a frame of its own, compiled once for all layers because the pre-hook
    hands it its own cache layer (`layer_cache`; docs/compiler.md, "torch.compile")."""
    import torch

    return torch.compiler.disable(fn, recursive=True)


def _features_vary(plan: Plan) -> bool:
    """Whether adaptive counts make the features' token count vary per call: the last
    stage deciding the features (vit.out, or a ViT layer up to the feature layer) has a
    range of output counts."""
    entry = plan.spec.feature_layer_index + 1
    deciding = [s for s in plan.stages if s.site.tower == "vit" and (s.site.layer is None or s.site.layer <= entry)]
    return bool(deciding) and deciding[-1].fewest_out != deciding[-1].tokens_out


def _video_token_id(config) -> int | None:
    video_token_id = getattr(config, "video_token_id", None)
    return getattr(config, "video_token_index", None) if video_token_id is None else video_token_id


def _image_token_id(config) -> int:
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise CompileError("the model's config has no image_token_id")
    return image_token_id


class Installer:
    """Installs `plan` on `model`; owns the hook registrations, their undo and the listing.

    Parameters
    ----------
    plan : Plan
        A checked plan (`vtdsl.compiler.resolve_plan`).
    model : nn.Module
        The transformers model of the plan's family, not compiled yet.
    """

    def __init__(self, plan: Plan, model: nn.Module, text_encoder=None):
        self.plan = plan
        self.text_encoder = text_encoder  # `clip_text`'s auxiliary CLIP (vtdsl.compiler.text_encoder)
        self.model = model
        self.spec = plan.spec
        self.family: Family = family_of(plan.spec)
        self.listing = Listing(plan, type(model).__name__)
        self.log = ForwardLog()
        self.handle = Compiled(plan, self.listing, self.log, plan.image_placeholders, self.spec.image_tokens,
                               _model=model)
        self.stages = {tower: [s for s in plan.stages if s.site.tower == tower] for tower in ("vit", "llm")}
        self.observations = {tower: [o for o in plan.observations if o.tower == tower] for tower in ("vit", "llm")}

    def __enter__(self) -> Compiled:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()

    # ------------------------------------------------------------------ primitives
    def hook(self, module_path: str, kind: str, fn: Callable, what: str, eager: bool = True, **kw) -> None:
        """Register a forward pre-hook (`kind` "pre") or hook ("post") on a submodule,
        run outside torch.compile (`_eager`) unless `eager` is False."""
        module = self.model.get_submodule(module_path)
        fn = _eager(fn) if eager else fn
        if kind == "pre":
            handle = module.register_forward_pre_hook(fn, **kw)
            self.listing.add(module_path or "<model>", "forward-pre-hook", what)
        else:
            handle = module.register_forward_hook(fn, **kw)
            self.listing.add(module_path or "<model>", "forward-hook", what)
        self.handle._undo.append(handle.remove)

    def swap(self, module_path: str, new: nn.Module) -> nn.Module:
        """Put `new` where `module_path` is; returns the original (put back on undo)."""
        head, _, name = module_path.rpartition(".")
        parent = self.model.get_submodule(head) if head else self.model
        original = getattr(parent, name)
        setattr(parent, name, new)

        def restore(parent=parent, name=name, original=original) -> None:
            setattr(parent, name, original)

        self.handle._undo.append(restore)
        return original

    def override(self, owner_path: str, name: str, fn: Callable, mechanism: str, what: str) -> Any:
        """Set the instance attribute `name` of a submodule (a method override or wrapper);
        returns the instance attribute it shadows (None), which undo restores."""
        owner = self.model.get_submodule(owner_path)
        previous = owner.__dict__.get(name, _MISSING)
        setattr(owner, name, fn)

        def restore(owner=owner, previous=previous) -> None:
            if previous is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = previous

        self.handle._undo.append(restore)
        self.listing.add(f"{owner_path or '<model>'}.{name}", mechanism, what)
        return None if previous is _MISSING else previous

    # ------------------------------------------------------------------ the steps
    def install(self) -> Compiled:
        """Install every step; on any failure undo what was installed and re-raise."""
        if compiled(self.model) is not None:
            raise CompileError("this model is already compiled; call vtdsl.compiler.uncompile(model) first")
        image_token_id = _image_token_id(self.model.config)
        try:
            vit_rt = self._install_vit()
            trims = self._install_features(vit_rt)
            plans = self._install_image_sizes()
            llm_rt = self._install_llm(vit_rt, plans, trims, image_token_id)
            self.family.install_llm(self, self.plan, llm_rt)
            self._install_prompt(plans, llm_rt, trims, image_token_id)
            video_token_id = _video_token_id(self.model.config) if self.family.video_argument else None
            install_decode(self, (image_token_id,) if video_token_id is None else (image_token_id, video_token_id),
                           llm_rt)
        except BaseException:
            self.handle.remove()
            raise
        self.model.__dict__[ATTR] = self.handle
        return self.handle

    def _install_vit(self):
        """ViT stages: the encoder's fx rewrite, score captures, the projector pre-hook."""
        from .vit import VitRuntime

        stages, observations = self.stages["vit"], self.observations["vit"]
        self.listing.mechanism["vit"] = "none"
        if not stages and not observations:
            return None
        if self.spec.packed_units:  # the tower's merger reads whole units: its own block loop
            from . import merge_units

            return merge_units.install(self, self.plan, self.log)
        if self.spec.merged_features:  # the connector fuses patch groups: stages keep whole ones
            from .vit_groups import GroupVitRuntime as runtime
        else:
            runtime = VitRuntime
        rt = runtime(self.plan, self.spec.vit.heads, self.log)
        rt.aux = self.text_encoder
        self._swap_encoder(rt, stages)
        self._hook_vit_observations(rt, observations)
        spec = self.spec
        if rt.needs_cls_feature:
            feature_layer = spec.feature_layer_index
            self.hook(spec.vit_layer_path.format(i=feature_layer), "post", _vit_cls_capture(rt),
                      f"capture the CLS row of the features (vit.layer{feature_layer} output) for 'cls_token'",
                      eager=False)  # as _hook_vit_observations
        out_what = "; ".join(f"stage {s.index} vit.out: {stage_text(s)} ({s.tokens_in} -> {s.tokens_out})"
                             for s in stages if s.site.layer is None)
        self.hook(spec.projector_path, "pre", rt.projector_pre_hook,
                  out_what or "take the feature-layer token set (bookkeeping for later stages)",
                  eager=False)  # as _hook_vit_observations
        return rt

    def _swap_encoder(self, rt, stages: list[ResolvedStage]) -> None:
        from .vit import build_vit

        encoder_path = self.family.encoder_path(self.spec)
        original, gm = build_vit(self.model, self.plan, rt, encoder_path)
        self.swap(encoder_path, gm)
        self.listing.mechanism["vit"] = "fx"
        self.listing.fx_code[encoder_path] = gm.code
        inserted = ["vtdsl_vit_begin (reset token bookkeeping)"]
        what = "merge units, CLS kept" if self.spec.vit_units > 1 else "patches, CLS kept"
        for s in stages:
            if s.site.layer is not None:
                inserted.append(f"vtdsl_vit_stage{s.index} before layers.{s.site.layer}: {stage_text(s)} "
                                f"({s.tokens_in} -> {s.tokens_out} {what})")
        if any(n.target == "vtdsl_vit_end" for n in gm.graph.nodes if n.op == "call_module"):
            inserted.append("vtdsl_vit_end (the kept units' patches back to their raster rows, the dropped "
                            "ones zero, for the connector's shuffle or pool; its pre-hook keeps the kept units)")
        self.listing.add(encoder_path, "fx", f"{type(original).__name__} traced with layers as leaves -> "
                         f"{type(gm).__name__}; inserted " + "; ".join(inserted))

    def _hook_vit_observations(self, rt, observations) -> None:
        # ViT hooks stay traced (`_eager` is for the LLM's per-layer hooks): with them or
        # the encoder's stage nodes skipped, torch 2.13's dynamo never ran these captures
        # under torch.compile ("nothing was captured", tests/test_torch_compile.py); they sit
        # on observed layers only, so they do not recompile per layer.
        for obs in observations:
            layer_path = self.spec.vit_layer_path.format(i=obs.layer) if obs.layer >= 0 else None
            label = f"{obs.scorer}@vit.layer{obs.layer}"
            projections = by_canonical(obs.scorer).projections
            if not projections:  # reads the layer's hidden state
                if layer_path is not None:
                    self.hook(layer_path, "post", _vit_capture(rt, obs.layer, "h"), f"capture output for {label}",
                              eager=False)
                continue
            attention = f"{layer_path}.{self.family.vit_attention}"
            for key in projections:
                self.hook(f"{attention}.{key}_proj", "post", _vit_capture(rt, obs.layer, key),
                          f"capture {key}_proj output for {label}", eager=False)

    def _install_features(self, vit_rt) -> bool:
        """Between the projector and the LLM: padding for adaptive ViT counts (the prompt
        keeps room for the bound, trimmed again at the LLM input) and the family's own
        rewrites. Returns whether the features' count varies per call."""
        # a merge-unit tower hands the unpruned layout on (dropped rows removed at the LLM
        # input, whatever the count), so nothing is padded
        trims = _features_vary(self.plan) and not self.spec.packed_units
        self.family.check(self.plan, trims)
        if trims:
            self.hook(self.spec.projector_path, "post", vit_rt.pad_features,
                      f"pad each image's features to the {self.plan.projector_tokens} planned (adaptive counts)",
                      eager=False)
        self.family.install(self, self.plan)
        return trims

    def _install_image_sizes(self) -> PlanCache:
        """On families whose counts depend on the image, record each call's image size
        where the images are encoded, so the LLM stages run the plan checked for it
        (`vtdsl.compiler.layouts`)."""
        plans = PlanCache(self.plan)
        if not self.family.sized_per_image:
            return plans
        owner_path = self.family.multimodal_path(self.spec)

        def record_image(kwargs: dict) -> None:
            plans.current = plans.for_call(kwargs)

        def record_video(kwargs: dict) -> None:
            plans.video = plans.for_video(kwargs)

        self._record_calls(owner_path, "get_image_features", ("pixel_values", self.family.size_argument),
                           record_image, "record the image size: LLM stages and placeholders follow the plan checked "
                           "for it")
        # on families that take video, each call's video layout (temporal groups and grid):
        # LLM stages prune the video's tokens under the plan checked for it (a family that
        # refuses video overrode the method already)
        owner = self.model.get_submodule(owner_path)
        if (self.family.video_argument is not None and "get_video_features" not in owner.__dict__
                and hasattr(owner, "get_video_features")):
            self._record_calls(owner_path, "get_video_features", ("pixel_values_videos", self.family.video_argument),
                               record_video, "record the video layout: LLM stages prune its placeholders under the "
                               "plan checked for it")
        return plans

    def _record_calls(self, owner_path: str, method: str, names: tuple[str, str], record: Callable[[dict], None],
                      what: str) -> None:
        """Wrap the encoder `method` so that each call first hands `record` its inputs by
        name (`names`: the leading positional parameters)."""
        original = getattr(self.model.get_submodule(owner_path), method)

        @functools.wraps(original)  # generate() reads its signature to pick the encoder's inputs
        def wrapper(*args, **kwargs):
            record({**dict(zip(names, args)), **kwargs})
            return original(*args, **kwargs)

        self.override(owner_path, method, wrapper, "method-wrapper", what)

    def _install_llm(self, vit_rt, plans: PlanCache, trims: bool, image_token_id: int):
        """LLM stages and scores: hooks on the multimodal model, the language model's
        input, every decoder layer, and the projections scores read."""
        self.listing.mechanism["llm"] = "none"
        if not (self.stages["llm"] or self.observations["llm"] or trims or _drops_units(vit_rt)):
            return None
        self.listing.mechanism["llm"] = "hooks"
        rt = self._llm_runtime(vit_rt, plans, image_token_id)
        self.hook(self.family.multimodal_path(self.spec), "pre", rt.llava_pre_hook,
                  "record which prompt rows are image tokens", with_kwargs=True)
        self._hook_llm_input(rt, trims or _drops_units(vit_rt))
        self._hook_llm_layers(rt)
        for j in rt.input_obs_at:
            rt.input_layers[j] = self.model.get_submodule(self.spec.llm_layer_path.format(i=j))
        self._hook_llm_observations(rt)
        return rt

    def _llm_runtime(self, vit_rt, plans: PlanCache, image_token_id: int):
        from .llm import LlmRuntime

        spec, model = self.spec, self.model
        stages = self.stages["llm"]
        attn = model.get_submodule(spec.llm_layer_path.format(i=0) + ".self_attn")
        lm_path = self.family.language_model_path(spec)
        rotary = norm_weight = None
        if any(s.renumber for s in stages):
            try:
                rotary = model.get_submodule(lm_path + ".rotary_emb")
            except AttributeError:
                raise CompileError(f"'renumber' needs the rotary embedding {lm_path}.rotary_emb, which "
                                   f"{type(model).__name__} does not have") from None
        if any(t.normed for s in stages for t in s.terms):
            try:
                norm_weight = model.get_submodule(lm_path + ".norm").weight
            except AttributeError:
                raise CompileError(f"far(norm) needs the final norm {lm_path}.norm, which "
                                   f"{type(model).__name__} does not have") from None
        return LlmRuntime(self.plan, vit_rt, self.log, image_token_id=image_token_id,
                          video_token_id=_video_token_id(model.config) if self.family.video_argument else None,
                          num_heads=spec.llm.heads,
                          num_kv_heads=spec.llm.kv_heads, scaling=getattr(attn, "scaling", spec.llm.head_dim**-0.5),
                          rotary=rotary, plans=plans, norm_weight=norm_weight)

    def _hook_llm_input(self, rt, trims: bool) -> None:
        """`llm.layer0` stages (and the removal of adaptive padding) run on the language
        model's input, before transformers builds the mask."""
        layer0 = [s for s in self.stages["llm"] if s.site.layer == 0]
        if not layer0 and not trims:
            return
        what = [f"stage {s.index}: {stage_text(s)} ({s.tokens_in} -> {s.tokens_out} per image)" for s in layer0]
        if trims and rt.vit is not None and getattr(rt.vit, "kept_units", False) is not False:
            what.insert(0, "remove the rows of the merge units ViT stages dropped (positions kept)")
        elif trims:
            what.insert(0, "remove the padding rows of adaptive ViT counts (positions contiguous)")
        what.append("gather inputs_embeds, 2-D mask, position_ids to kept positions; decode: mask columns")
        self.hook(self.family.language_model_path(self.spec), "pre", rt.llm_input_pre_hook, "; ".join(what),
                  with_kwargs=True)

    def _hook_llm_layers(self, rt) -> None:
        stages, spec = self.stages["llm"], self.spec
        first = min((s.site.layer for s in stages), default=spec.llm.layers)
        for j in range(spec.llm.layers):
            what = []
            if j == 0:
                what.append("start per-prompt state (prefill = empty cache)")
            for s in stages:
                if s.site.layer == j and j > 0:
                    what.append(f"stage {s.index}: {stage_text(s)} ({s.tokens_in} -> {s.tokens_out} per image)")
            if j >= max(first, 1):
                renumbered = any(s.renumber and s.site.layer <= j for s in stages)
                what.append("re-numbered position_ids and their cos/sin, 4-D mask gathered to kept rows; "
                            "decode: shifted position_ids, mask key columns" if renumbered else
                            "gather cos/sin, position_ids, 4-D mask to kept positions; decode: mask key columns")
            if j in rt.observed:
                what.append("record positions/mask for scores")
            for obs in rt.input_obs_at.get(j, ()):
                what.append(f"score {obs.scorer}@llm.layer{j} on the layer's input (its norm, q/k, RoPE)")
            self.hook(spec.llm_layer_path.format(i=j), "pre", rt.layer_pre_hook(j),
                      "; ".join(what) or "phase tracking", with_kwargs=True)

    def _hook_llm_observations(self, rt) -> None:
        spec = self.spec
        for obs in self.observations["llm"]:
            label = f"{obs.scorer}@llm.layer{obs.layer}"
            if obs.on_input:
                continue  # computed by the layer's pre-hook from its input
            if not by_canonical(obs.scorer).projections:  # reads the layer's hidden state
                if obs.layer >= 0:
                    self.hook(spec.llm_layer_path.format(i=obs.layer), "post", rt.layer_post_hook(obs.layer),
                              f"capture output (prefill) for {label}")
                continue
            base = spec.llm_layer_path.format(i=obs.layer) + ".self_attn"
            # per-head q/k norms (Qwen3) act before RoPE: the scores read their outputs
            normed = hasattr(self.model.get_submodule(base), "q_norm")
            for key in ("q", "k"):
                if normed:
                    joined = _heads_joined(rt.proj_hook(obs.layer, key), self.family.norms_heads_first)
                    self.hook(f"{base}.{key}_norm", "post", joined,
                              f"capture {key}_norm output (per-head norm of {key}_proj; prefill) for {label}")
                else:
                    self.hook(f"{base}.{key}_proj", "post", rt.proj_hook(obs.layer, key),
                              f"capture {key}_proj output (prefill) for {label}")

    def _install_prompt(self, plans: PlanCache, llm_rt, trims: bool, image_token_id: int) -> None:
        """The prompt: shorten each image's placeholder run (forward and `generate`), and
        gather the labels to the rows the LLM keeps."""
        spec, plan, model = self.spec, self.plan, self.model
        needs_rewrite = plan.image_placeholders != spec.image_tokens
        # the LLM sees fewer rows than the prompt: labels follow
        rows_change = bool(self.stages["llm"]) or trims or _drops_units(llm_rt.vit if llm_rt is not None else None)
        if not needs_rewrite and not rows_change:
            return
        config = model.config
        pad = getattr(getattr(config, "text_config", config), "pad_token_id", None) or 0
        top = _TopLevel(model, image_token_id, plans, pad, llm_rt)
        what = []
        if needs_rewrite:
            what.append(f"shrink image placeholders {spec.image_tokens} -> {plan.image_placeholders} per image "
                        "(input_ids, attention_mask, labels, position_ids)")
        if rows_change:
            what.append("labels: loss on the kept positions")
        self.hook("", "pre", top.pre_hook, "; ".join(what), with_kwargs=True)
        if rows_change:
            self.hook("", "post", top.post_hook, "loss from labels gathered to the kept positions")
        if needs_rewrite:
            generate = PromptGenerate(model, top.rewrite)
            generate.previous = self.override(
                "", "generate", generate, "method-wrapper",
                f"shrink image placeholders {spec.image_tokens} -> {plan.image_placeholders} "
                "before generation (returned ids: the caller's prompt, then the new tokens)")


def _drops_units(vit_rt) -> bool:
    """Whether ViT stages drop merge units whose rows the LLM input must remove
    (`vtdsl.compiler.merge_units`)."""
    return vit_rt is not None and getattr(vit_rt, "kept_units", False) is not False and any(
        s.site.tower == "vit" for s in vit_rt.plan.stages)


def _heads_joined(hook: Callable, heads_first: bool = False) -> Callable:
    """`hook` handed a per-head ``[B, n, H, dh]`` output (``[B, H, n, dh]`` when
    `heads_first`) as the ``[B, n, H·dh]`` of a projection."""
    def joined(module, args, output):
        return hook(module, args, (output.transpose(1, 2) if heads_first else output).flatten(-2))

    return joined


def _vit_capture(rt, layer: int, key: str):
    def capture(module, args, output):
        rt.capture(layer, key, output[0] if isinstance(output, tuple) else output)

    return capture


def _vit_cls_capture(rt):
    def capture(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        rt.cls_feature = h[:, :1]

    return capture


def _forward_params(model: nn.Module) -> list[str]:
    sig = inspect.signature(type(model).forward)
    return [p.name for p in list(sig.parameters.values())[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


class _TopLevel:
    """Prompt rewriting and label handling around the top-level forward (and, through
    `generation.PromptGenerate`, generate)."""

    def __init__(self, model, image_token_id, plans: PlanCache, pad, llm_rt):
        self.model = model
        self.params = _forward_params(model)
        self.plans = plans
        self.kw = dict(image_token_id=image_token_id, pad_token_id=pad)
        self.llm_rt = llm_rt
        self.labels = None

    def pre_hook(self, module, args, kwargs):
        if args:
            kwargs = {**dict(zip(self.params, args)), **kwargs}
            args = ()
        kwargs = self.rewrite(kwargs)
        self.labels = None
        if self.llm_rt is not None and kwargs.get("labels") is not None:
            kwargs = dict(kwargs)
            self.labels = kwargs.pop("labels")
        return args, kwargs

    def rewrite(self, kwargs: dict) -> dict:
        from_count, to_count = self.plans.counts(kwargs)
        return maybe_rewrite(kwargs, from_count=from_count, to_count=to_count, crops=self.plans.plan.spec.vit_crops,
                             **self.kw)

    def post_hook(self, module, args, output):
        labels, self.labels = self.labels, None
        st = self.llm_rt.state if self.llm_rt is not None else None
        if labels is None or st is None or not hasattr(output, "logits"):
            return None
        logits = output.logits
        if logits.shape[1] == st.pos.shape[1]:
            labels = labels.to(st.pos.device).gather(1, st.pos)
        elif logits.shape[1] != labels.shape[1]:
            raise CompileError("labels need full logits (logits_to_keep=0) when LLM stages prune the sequence")
        vocab = self.model.config.get_text_config().vocab_size
        output["loss"] = self.model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
        return output
