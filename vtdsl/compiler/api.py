"""`compile` / `apply`: install a checked plan on a LLaVA model, reversibly."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..ir.plan import Plan
from ..lang import ast
from ..lang.errors import PolicyError
from ..models.spec import ModelSpec
from .inputs import maybe_rewrite
from .layouts import PlanCache, varies_with_image
from .listing import Listing, stage_text
from .runtime import CompileError, ForwardLog

_ATTR = "_vtdsl_compiled"
_MISSING = object()


@dataclasses.dataclass
class Compiled:
    """Handle of an installed plan: the plan, the listing, and how to undo it."""

    plan: Plan
    listing: Listing
    log: ForwardLog
    image_tokens: int  # placeholders per image the compiled model expects
    original_image_tokens: int
    _undo: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)
    _model: Any = dataclasses.field(default=None, repr=False)

    def remove(self) -> None:
        """Undo every rewrite, last first. Safe to call twice."""
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                errors.append(exc)
        if self._model is not None and self._model.__dict__.get(_ATTR) is self:
            del self._model.__dict__[_ATTR]
        self._model = None
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------- plan resolution
def _spec_of(model: nn.Module, spec: ModelSpec | str | None) -> ModelSpec:
    from ..models import get_spec, spec_from_config

    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return get_spec(spec)
    return spec_from_config(model)


_SAME = ("vit", "llm", "image_size", "patch_size", "has_cls", "vision_feature_layer", "select_strategy", "vit_crops",
         "anyres_grid", "spatial_merge", "vit_window")


def _check_fits(plan_spec: ModelSpec, model_spec: ModelSpec) -> None:
    for name in _SAME:
        a, b = getattr(plan_spec, name), getattr(model_spec, name)
        if a != b:
            raise CompileError(
                f"the plan was checked against '{plan_spec.name}', whose {name} ({a}) differs from the model's ({b})"
            )


def resolve_plan(policy: Plan | ast.Policy | str | Path, model: nn.Module, spec: ModelSpec | str | None = None) -> Plan:
    """A checked `Plan` for `model` from a Plan, an AST, a path or policy source text.

    Without `spec` the model's spec comes from its config; when the policy names a
    registered model (``model "llava-1.5-7b"``) with the same architecture, that spec
    (and its name) is used, so no "written for another model" warning appears.
    """
    from ..ir import check
    from ..lang.source import load_policy
    from ..models import get_spec

    model_spec = _spec_of(model, spec)
    if isinstance(policy, Plan):
        _check_fits(policy.spec, model_spec)
        return policy
    policy, source, filename = load_policy(policy)
    if spec is None and policy.model:
        try:
            named = get_spec(policy.model)
            _check_fits(named, model_spec)
            model_spec = named
        except (CompileError, ValueError, PolicyError):
            pass  # a different architecture: check against the model's own spec (and warn)
    return check(policy, model_spec, source=source, filename=filename)


# ---------------------------------------------------------------------- installation
def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, name = path.rpartition(".")
    return (model.get_submodule(head) if head else model), name


def _forward_params(model: nn.Module) -> list[str]:
    sig = inspect.signature(type(model).forward)
    return [p.name for p in list(sig.parameters.values())[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _features_vary(plan: Plan) -> bool:
    """Whether adaptive counts make the features' token count vary per call: the last
    stage deciding the features (vit.out, or a ViT layer up to the feature layer) has a
    range of output counts."""
    entry = plan.spec.feature_layer_index + 1
    deciding = [s for s in plan.stages if s.site.tower == "vit" and (s.site.layer is None or s.site.layer <= entry)]
    return bool(deciding) and deciding[-1].fewest_out != deciding[-1].tokens_out


def _install(plan: Plan, model: nn.Module) -> Compiled:
    from .llm import LlmRuntime
    from .vit import VitRuntime, build_vit, projections_read

    if model.__dict__.get(_ATTR) is not None:
        raise CompileError("this model is already compiled; call vtdsl.compiler.uncompile(model) first")
    spec = plan.spec
    listing = Listing(plan, type(model).__name__)
    log = ForwardLog()
    handle = Compiled(plan, listing, log, plan.image_placeholders, spec.image_tokens, _model=model)
    undo = handle._undo
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        raise CompileError("the model's config has no image_token_id")

    def hook(module_path: str, kind: str, fn, what: str, **kw) -> None:
        module = model.get_submodule(module_path)
        if kind == "pre":
            h = module.register_forward_pre_hook(fn, **kw)
            listing.add(module_path or "<model>", "forward-pre-hook", what)
        else:
            h = module.register_forward_hook(fn, **kw)
            listing.add(module_path or "<model>", "forward-hook", what)
        undo.append(h.remove)

    try:
        # ------------------------------------------------------------------ ViT
        vit_stages = [s for s in plan.stages if s.site.tower == "vit"]
        vit_obs = [o for o in plan.observations if o.tower == "vit"]
        vit_rt = None
        listing.mechanism["vit"] = "none"
        if vit_stages or vit_obs:
            vit_rt = VitRuntime(plan, spec.vit.heads, log)
            layer0 = spec.vit_layer_path.format(i=0)
            layers_path = layer0.rpartition(".")[0]
            encoder_path = layers_path.rpartition(".")[0]
            original, gm = build_vit(model, plan, vit_rt, encoder_path)
            parent, name = _parent(model, encoder_path)
            setattr(parent, name, gm)

            def restore_encoder(parent=parent, name=name, original=original) -> None:
                setattr(parent, name, original)

            undo.append(restore_encoder)
            listing.mechanism["vit"] = "fx"
            listing.fx_code[encoder_path] = gm.code
            inserted = ["vtdsl_vit_begin (reset token bookkeeping)"]
            for s in vit_stages:
                if s.site.layer is not None:
                    inserted.append(
                        f"vtdsl_vit_stage{s.index} before layers.{s.site.layer}: {stage_text(s)} "
                        f"({s.tokens_in} -> {s.tokens_out} patches, CLS kept)"
                    )
            listing.add(
                encoder_path,
                "fx",
                f"{type(original).__name__} traced with layers as leaves -> {type(gm).__name__}; inserted "
                + "; ".join(inserted),
            )
            for obs in vit_obs:
                layer_path = spec.vit_layer_path.format(i=obs.layer) if obs.layer >= 0 else None
                label = f"{obs.scorer}@vit.layer{obs.layer}"
                if obs.scorer == "norm":
                    if layer_path is not None:
                        hook(layer_path, "post", _vit_capture(vit_rt, obs.layer, "h"), f"capture output for {label}")
                    continue
                for key in projections_read(obs.scorer):
                    hook(f"{layer_path}.self_attn.{key}_proj", "post", _vit_capture(vit_rt, obs.layer, key),
                         f"capture {key}_proj output for {label}")
            if vit_rt.needs_cls_feature:
                feature_layer = spec.feature_layer_index
                hook(spec.vit_layer_path.format(i=feature_layer), "post", _vit_cls_capture(vit_rt),
                     f"capture the CLS row of the features (vit.layer{feature_layer} output) for 'cls_token'")
            out_what = "; ".join(f"stage {s.index} vit.out: {stage_text(s)} ({s.tokens_in} -> {s.tokens_out})"
                                 for s in vit_stages if s.site.layer is None)
            hook(spec.projector_path, "pre", vit_rt.projector_pre_hook,
                 out_what or "take the feature-layer token set (bookkeeping for later stages)")

        # an adaptive count decides how many tokens the features hold per image: the prompt
        # keeps room for the bound, padded after the projector and trimmed at the LLM input
        trims = _features_vary(plan)
        if trims and spec.anyres_grid is not None and plan.projector_tokens == spec.projector_tokens:
            raise CompileError(f"an adaptive count that may keep all {spec.patch_tokens} tokens of a crop leaves "
                               f"{spec.name}'s crops in their packed layout (newline tokens) or not, per call; "
                               "bound it below that, or end the vision-tower stages with a fixed count")
        if trims:
            hook(spec.projector_path, "post", vit_rt.pad_features,
                 f"pad each image's features to the {plan.projector_tokens} planned (adaptive counts)")
        if spec.anyres_grid is not None and plan.projector_tokens != spec.projector_tokens:
            _install_anyres_packing(model, spec, plan, undo, listing)
        plans = PlanCache(plan)
        if varies_with_image(spec):
            _install_size_recorder(model, spec, plans, undo, listing)

        # ------------------------------------------------------------------ LLM
        llm_stages = [s for s in plan.stages if s.site.tower == "llm"]
        llm_obs = [o for o in plan.observations if o.tower == "llm"]
        listing.mechanism["llm"] = "none"
        if llm_stages or llm_obs or trims:
            listing.mechanism["llm"] = "hooks"
            layer0 = spec.llm_layer_path.format(i=0)
            attn = model.get_submodule(layer0 + ".self_attn")
            scaling = getattr(attn, "scaling", spec.llm.head_dim**-0.5)
            lm_path = spec.llm_layer_path.format(i=0).rpartition(".")[0].rpartition(".")[0]
            rotary = None
            if any(s.renumber for s in llm_stages):
                try:
                    rotary = model.get_submodule(lm_path + ".rotary_emb")
                except AttributeError:
                    raise CompileError(f"'renumber' needs the rotary embedding {lm_path}.rotary_emb, which "
                                       f"{type(model).__name__} does not have") from None
            norm_weight = None
            if any(t.normed for s in llm_stages for t in s.terms):
                try:
                    norm_weight = model.get_submodule(lm_path + ".norm").weight
                except AttributeError:
                    raise CompileError(f"far(norm) needs the final norm {lm_path}.norm, which "
                                       f"{type(model).__name__} does not have") from None
            llm_rt = LlmRuntime(
                plan, vit_rt, log,
                image_token_id=image_token_id,
                num_heads=spec.llm.heads,
                num_kv_heads=spec.llm.kv_heads,
                scaling=scaling,
                rotary=rotary,
                plans=plans,
                norm_weight=norm_weight,
            )
            llava_path = spec.llm_layer_path.format(i=0).split(".")[0]  # "model"
            hook(llava_path, "pre", llm_rt.llava_pre_hook, "record which prompt rows are image tokens",
                 with_kwargs=True)
            first = min((s.site.layer for s in llm_stages), default=spec.llm.layers)
            layer0_stages = [s for s in llm_stages if s.site.layer == 0]
            if layer0_stages or trims:
                what = [f"stage {s.index}: {stage_text(s)} ({s.tokens_in} -> {s.tokens_out} per image)"
                        for s in layer0_stages]
                if trims:
                    what.insert(0, "remove the padding rows of adaptive ViT counts (positions contiguous)")
                what.append("gather inputs_embeds, 2-D mask, position_ids to kept positions; decode: mask columns")
                hook(lm_path, "pre", llm_rt.llm_input_pre_hook, "; ".join(what), with_kwargs=True)
            for j in range(spec.llm.layers):
                what = []
                if j == 0:
                    what.append("start per-prompt state (prefill = empty cache)")
                for s in llm_stages:
                    if s.site.layer == j and j > 0:
                        what.append(f"stage {s.index}: {stage_text(s)} ({s.tokens_in} -> {s.tokens_out} per image)")
                if j >= max(first, 1):
                    renumbered = any(s.renumber and s.site.layer <= j for s in llm_stages)
                    what.append("re-numbered position_ids and their cos/sin, 4-D mask gathered to kept rows; "
                                "decode: shifted position_ids, mask key columns" if renumbered else
                                "gather cos/sin, position_ids, 4-D mask to kept positions; decode: mask key columns")
                if j in llm_rt.observed:
                    what.append("record positions/mask for scores")
                for obs in llm_rt.input_obs_at.get(j, ()):
                    what.append(f"score {obs.scorer}@llm.layer{j} on the layer's input (its norm, q/k, RoPE)")
                hook(spec.llm_layer_path.format(i=j), "pre", llm_rt.layer_pre_hook(j),
                     "; ".join(what) or "phase tracking", with_kwargs=True)
            for j in llm_rt.input_obs_at:
                llm_rt.input_layers[j] = model.get_submodule(spec.llm_layer_path.format(i=j))
            for obs in llm_obs:
                label = f"{obs.scorer}@llm.layer{obs.layer}"
                if obs.on_input:
                    continue  # computed by the layer's pre-hook from its input
                if obs.scorer == "norm":
                    if obs.layer >= 0:
                        hook(spec.llm_layer_path.format(i=obs.layer), "post", llm_rt.layer_post_hook(obs.layer),
                             f"capture output (prefill) for {label}")
                    continue
                base = spec.llm_layer_path.format(i=obs.layer) + ".self_attn"
                for key in ("q", "k"):
                    hook(f"{base}.{key}_proj", "post", llm_rt.proj_hook(obs.layer, key),
                         f"capture {key}_proj output (prefill) for {label}")
        else:
            llm_rt = None

        # ------------------------------------------------------------------ prompt
        needs_rewrite = plan.image_placeholders != spec.image_tokens
        rows_change = bool(llm_stages) or trims  # the LLM sees fewer rows than the prompt: labels follow
        if needs_rewrite or rows_change:
            pad = getattr(getattr(config, "text_config", config), "pad_token_id", None) or 0
            top = _TopLevel(model, image_token_id, plans, pad, llm_rt)
            what = []
            if needs_rewrite:
                what.append(
                    f"shrink image placeholders {spec.image_tokens} -> {plan.image_placeholders} per image "
                    "(input_ids, attention_mask, labels, position_ids)"
                )
            if rows_change:
                what.append("labels: loss on the kept positions")
            hook("", "pre", top.pre_hook, "; ".join(what), with_kwargs=True)
            if rows_change:
                hook("", "post", top.post_hook, "loss from labels gathered to the kept positions")
            if needs_rewrite:
                def generate(*args, **kwargs):
                    return top.generate(*args, **kwargs)

                generate.__doc__ = type(model).generate.__doc__
                previous = model.__dict__.get("generate", _MISSING)
                top.previous_generate = None if previous is _MISSING else previous
                model.generate = generate

                def unwrap_generate(previous=previous) -> None:
                    if previous is _MISSING:
                        model.__dict__.pop("generate", None)
                    else:
                        model.__dict__["generate"] = previous

                undo.append(unwrap_generate)
                listing.add("<model>.generate", "method-wrapper",
                            f"shrink image placeholders {spec.image_tokens} -> {plan.image_placeholders} "
                            "before generation (returned ids hold the shortened prompt)")
    except BaseException:
        handle.remove()
        raise
    model.__dict__[_ATTR] = handle
    return handle


def _install_anyres_packing(model, spec: ModelSpec, plan: Plan, undo: list, listing: Listing) -> None:
    """LLaVA-NeXT packs each image's crops into a spatial map (unpad, one newline token per
    row), which needs every crop's full 24x24 grid. With pruned crops, the kept tokens of
    each crop are concatenated in crop order (base view first) instead, as the published
    anyres pruning methods do: `crops x k` visual tokens per image, no newline tokens."""
    owner_path = spec.projector_path.rpartition(".")[0]
    owner = model.get_submodule(owner_path)
    if not hasattr(owner, "pack_image_features"):
        raise CompileError(f"{type(owner).__name__} has no pack_image_features to replace")

    def pack_image_features(image_features, image_sizes=None, vision_feature_select_strategy=None,
                            image_newline=None):
        packed = [f.reshape(-1, f.shape[-1]) for f in image_features]
        lens = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=packed[0].device)
        return packed, lens

    owner.pack_image_features = pack_image_features

    def restore(owner=owner) -> None:
        owner.__dict__.pop("pack_image_features", None)

    undo.append(restore)
    per_crop = plan.projector_tokens // spec.vit_crops
    listing.add(f"{owner_path}.pack_image_features", "method-override",
                f"concatenate each image's pruned crops ({per_crop} tokens each, base view first) instead of "
                "unpadding them into a map with newline tokens")


def _install_size_recorder(model, spec: ModelSpec, plans: PlanCache, undo: list, listing: Listing) -> None:
    """Record each call's image size where the images are encoded, so the LLM stages run
    the plan checked for it (`vtdsl.compiler.layouts`)."""
    owner_path = spec.projector_path.split(".")[0]  # the multimodal model ("model")
    owner = model.get_submodule(owner_path)
    original = owner.get_image_features

    @functools.wraps(original)  # generate() reads its signature to pick the encoder's inputs
    def get_image_features(*args, **kwargs):
        names = ("pixel_values", "image_sizes" if spec.anyres_grid is not None else "image_grid_thw")
        plans.current = plans.for_call({**dict(zip(names, args)), **kwargs})
        return original(*args, **kwargs)

    owner.get_image_features = get_image_features

    def restore(owner=owner) -> None:
        owner.__dict__.pop("get_image_features", None)

    undo.append(restore)
    listing.add(f"{owner_path}.get_image_features", "method-wrapper",
                "record the image size: LLM stages and placeholders follow the plan checked for it")


def _vit_capture(rt, layer: int, key: str):
    def capture(module, args, output):
        rt.capture(layer, key, output[0] if isinstance(output, tuple) else output)

    return capture


def _vit_cls_capture(rt):
    def capture(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        rt.cls_feature = h[:, :1]

    return capture


class _TopLevel:
    """Prompt rewriting and label handling around the top-level forward / generate."""

    def __init__(self, model, image_token_id, plans: PlanCache, pad, llm_rt):
        self.model = model
        self.params = _forward_params(model)
        self.plans = plans
        self.kw = dict(image_token_id=image_token_id, pad_token_id=pad)
        self.llm_rt = llm_rt
        self.labels = None
        self.previous_generate = None  # an instance-level generate that was there before

    def pre_hook(self, module, args, kwargs):
        if args:
            kwargs = {**dict(zip(self.params, args)), **kwargs}
            args = ()
        kwargs = self._rewrite(kwargs)
        self.labels = None
        if self.llm_rt is not None and kwargs.get("labels") is not None:
            kwargs = dict(kwargs)
            self.labels = kwargs.pop("labels")
        return args, kwargs

    def _rewrite(self, kwargs: dict) -> dict:
        from_count, to_count = self.plans.counts(kwargs)
        return maybe_rewrite(kwargs, from_count=from_count, to_count=to_count, **self.kw)

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

    def generate(self, *args, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
            args = (None, *args[1:]) if len(args) > 1 else ()
        elif kwargs.get("inputs") is not None:
            kwargs["input_ids"] = kwargs.pop("inputs")
        kwargs = self._rewrite(kwargs)
        previous = self.previous_generate
        if previous is not None:
            return previous(*args, **kwargs)
        return type(self.model).generate(self.model, *args, **kwargs)


# ---------------------------------------------------------------------- public API
def compile(policy, model: nn.Module, *, spec: ModelSpec | str | None = None) -> nn.Module:  # noqa: A001
    """Rewrite `model` (a `LlavaForConditionalGeneration`) to run `policy`, in place.

    Parameters
    ----------
    policy : Plan, Policy, path or str
        A checked `vtdsl.ir.plan.Plan`, a parsed policy, a `.vt`/`.yaml` path, or source.
    model : LlavaForConditionalGeneration
        Any LLaVA model (real weights or the meta device); its `ModelSpec` is inferred
        from its config with `vtdsl.models.spec_from_config` unless `spec` is given.

    Returns
    -------
    The same model object, rewritten. `vtdsl.compiler.compiled(model)` gives the handle
    (plan, listing); `uncompile(model)` undoes the rewrite.

    Notes
    -----
    - Prompts keep the processor's placeholder count: the compiled forward / generate
      shorten each image's run to the compiled count (`image_token_count`); the ids
      `generate` returns hold the shortened prompt.
    - After an LLM stage the sequence is shorter from that layer on: `logits` cover the
      kept positions in order (`kept_tokens` says which image positions survived),
      `labels` are gathered to them automatically, and the KV cache of layers >= K is
      shorter. Decoding needs the default `DynamicCache`.
    - Do not deep-copy a compiled model (its hooks would point at the original's
      bookkeeping); compile the copy instead.
    """
    plan = resolve_plan(policy, model, spec)
    _install(plan, model)
    return model


@contextlib.contextmanager
def apply(policy, model: nn.Module, *, spec: ModelSpec | str | None = None) -> Iterator[nn.Module]:
    """`with apply(policy, model):` runs `policy` inside the block and restores the
    original module tree on exit (hooks removed, swapped modules put back)."""
    plan = resolve_plan(policy, model, spec)
    handle = _install(plan, model)
    try:
        yield model
    finally:
        handle.remove()


def compiled(model: nn.Module) -> Compiled | None:
    """The handle of the plan installed on `model`, or None."""
    return model.__dict__.get(_ATTR)


def uncompile(model: nn.Module) -> nn.Module:
    """Undo `compile(…, model)`; a model that is not compiled is returned unchanged."""
    handle = compiled(model)
    if handle is not None:
        handle.remove()
    return model


def image_token_count(model: nn.Module) -> int:
    """Image placeholder tokens per image that `model` (compiled or not) expects."""
    handle = compiled(model)
    if handle is not None:
        return handle.image_tokens
    return original_image_token_count(model)


def original_image_token_count(model: nn.Module) -> int:
    """Image placeholder tokens per image of the unpruned model."""
    handle = compiled(model)
    if handle is not None:
        return handle.original_image_tokens
    return _spec_of(model, None).image_tokens


def kept_counts(model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """Visual tokens per image (in, out) at each stage during the last forward."""
    handle = compiled(model)
    if handle is None:
        return {"vit": {}, "llm": {}}
    return {"vit": dict(handle.log.vit), "llm": dict(handle.log.llm)}


def kept_tokens(model: nn.Module) -> dict[str, Tensor]:
    """Which tokens each stage kept during the last forward (see `ForwardLog`)."""
    handle = compiled(model)
    return {} if handle is None else dict(handle.log.kept)


__all__ = [
    "Compiled",
    "kept_tokens",
    "CompileError",
    "apply",
    "compile",
    "compiled",
    "image_token_count",
    "kept_counts",
    "original_image_token_count",
    "resolve_plan",
    "uncompile",
]
