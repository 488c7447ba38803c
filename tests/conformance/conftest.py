"""Shared plumbing for the conformance tests: the tiny LLaVA with sharpened attention
(eager and sdpa, same weights), the seeded prompts and images, and the compiled run that
reports which tokens each stage kept. This is the only module here that imports vtdsl;
the references (test modules, plain.py) never do."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.models import get_spec

from . import plain

POLICIES = Path(__file__).resolve().parents[2] / "policies"
VISION_START, VISION_END, QWEN_IMAGE = 251, 252, 250  # tiny Qwen-VL's vision start/end and image ids
SPEC = get_spec("tiny-llava")
SEEDS = (0, 1, 2)
ATTNS = ("eager", "sdpa")
# the references read eager attention; the sdpa runs check that the zoo keeps the same
# tokens without it (slow: they double the compiled runs)
IMPLS = ("eager", pytest.param("sdpa", marks=pytest.mark.slow))
PREFIX = [5, 6, 7]


def qwen_image_case(seed: int, rows: int, cols: int, question: int) -> dict:
    """One Qwen-VL prompt (tiny-qwen2.5-vl / tiny-qwen2-vl ids): 3 text ids, a rows x cols
    patch image between vision start/end, `question` random ids; random patch pixels
    (2 frames x 14 x 14 x 3 values per patch), all drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    asked = torch.randint(10, 240, (question,), generator=g).tolist()
    ids = torch.tensor([[5, 6, 7, VISION_START] + [QWEN_IMAGE] * (rows * cols // 4) + [VISION_END] + asked])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(rows * cols, 1176, generator=g),
                image_grid_thw=torch.tensor([[1, rows, cols]]), mm_token_type_ids=(ids == QWEN_IMAGE).int())


@dataclass(frozen=True)
class Case:
    """One seeded input: a prompt with 576 image placeholders after PREFIX and a question
    of 5 + seed random tokens, and one random image."""

    seed: int
    ids: torch.Tensor
    px: torch.Tensor

    @property
    def image_start(self) -> int:
        return len(PREFIX)


def _case(seed: int) -> Case:
    g = torch.Generator().manual_seed(1000 + seed)
    question = torch.randint(10, 250, (5 + seed,), generator=g).tolist()
    ids = torch.tensor([PREFIX + [SPEC.image_token_id] * 576 + question])
    return Case(seed, ids, torch.randn(1, 3, 336, 336, generator=g))


def _peaked(attn: str, vit_factor: float = 8.0) -> torch.nn.Module:
    """Seed-0 weights with every query projection scaled by 8 (as plain_refs.peaked):
    near-uniform random attention would make the authors' top-k ambiguous."""
    model = SPEC.build(device="cpu", attn_implementation=attn, seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(vit_factor)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def tiny() -> dict:
    return {"image_token_id": SPEC.image_token_id, "feature_layer": SPEC.feature_layer_index,
            "grid": 24, "patches": 576}


@pytest.fixture(scope="session")
def models() -> dict:
    return {attn: _peaked(attn) for attn in ATTNS}


@pytest.fixture(scope="session")
def sharpened():
    """`sharpened(factor)`: {attn: model} with the ViT queries scaled by `factor` instead
    of 8, for rules that only show on very peaked ViT attention (FlowCut's entropy counts
    before the last cut, HoloV's chunk overflow)."""
    return lru_cache(maxsize=None)(lambda factor: {attn: _peaked(attn, vit_factor=factor) for attn in ATTNS})


@pytest.fixture(scope="session")
def ref(models):
    """The plain eager model the references read (the authors' code needs eager)."""
    return models["eager"]


@pytest.fixture(scope="session")
def once():
    """`once(key, fn)`: fn() the first time a key is asked for (a reference shared by the
    eager and sdpa runs is computed once)."""
    store: dict = {}

    def get(key, fn):
        if key not in store:
            store[key] = fn()
        return store[key]
    return get


@pytest.fixture(scope="session")
def cases() -> list[Case]:
    return [_case(s) for s in SEEDS]


@pytest.fixture(scope="session")
def vit_out(ref):
    """Cached plain ViT run of a case (attentions, hidden states)."""
    return lru_cache(maxsize=None)(lambda case: plain.vit(ref, case.px))


@pytest.fixture(scope="session")
def llm_in(ref, vit_out, tiny):
    """Cached input embeddings of a case's plain LLM: the prompt with its 576 projected
    feature-layer patches (``[1, N, d]``); the references run the layers from there."""
    def run(case):
        feats = vit_out(case).hidden_states[tiny["feature_layer"] + 1][0, 1:]
        return plain.embeds(ref, case.ids, tiny["image_token_id"], plain.project(ref, feats))
    return lru_cache(maxsize=None)(run)


@pytest.fixture(scope="session")
def compiled(models):
    """`compiled(policy, attn, case)`: the policy (a zoo file name or source text)
    compiled into the model of that attention implementation, one forward of the case;
    `clip` / `question`: a CLIP directory for `clip_text` and the question it encodes;
    returns each stage's kept tokens as lists (ViT stages: vid = 1 + patch index, 0 = CLS;
    LLM stages: positions in the prompt the compiled model ran) and the projected
    visual tokens the LLM received (``[n, d]``)."""
    def run(policy: str, attn: str, case: Case, model=None, clip=None, question=None):
        named = "\n" not in policy and (POLICIES / f"{policy}.vt").exists()  # a zoo name, or source text
        source = POLICIES / f"{policy}.vt" if named else policy
        model = models[attn] if model is None else model
        got = []
        encoder = None
        if clip is not None:  # `clip_text`: the auxiliary CLIP directory and the question to ask it
            from vtdsl.compiler.text_encoder import TextEncoder

            encoder = TextEncoder.load(clip)
            encoder.ask(question)
        hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: got.append(out))
        try:
            with vc.apply(source, model, text_encoder=encoder), torch.no_grad():
                logits = model(input_ids=case.ids, pixel_values=case.px).logits
                kept = {k: v[0].tolist() for k, v in vc.kept_tokens(model).items()}
        finally:
            hook.remove()
        return kept, got[0][0], logits[0, -1]
    return run


def video_kept(policy: Path, model, inputs: dict, vid: int, stage: str = "llm.layer0#0") -> list[int]:
    """The video rows (0 = the clip's first placeholder) a compiled policy's stage keeps on
    one forward of `inputs`."""
    with vc.apply(policy, model), torch.no_grad():
        model(**inputs)
        kept = vc.kept_tokens(model)[stage][0]
    first = int((inputs["input_ids"][0] == vid).nonzero()[0])
    return [p - first for p in kept.tolist()]


@pytest.fixture(scope="session")
def qwen_video():
    """tiny-qwen2.5-vl's video token id and its sharpened {attn: model} pair, with
    `clip(groups, side, seed)`: one video of `groups` temporal groups of side x side
    patches between vision start/end, random pixels (the video methods' inputs)."""
    from plain_refs import sharpened_pair

    spec = get_spec("tiny-qwen2.5-vl")
    vid = spec.config().video_token_id

    def clip(groups: int, side: int, seed: int) -> dict:
        n = groups * (side // 2) ** 2
        ids = torch.tensor([[5, 6, 7, VISION_START] + [vid] * n + [VISION_END, 8, 9, 10]])
        px = torch.randn(groups * side * side, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=px,
                    video_grid_thw=torch.tensor([[groups, side, side]]), mm_token_type_ids=(ids == vid).int() * 2)

    return vid, sharpened_pair(spec), clip


@pytest.fixture(scope="session")
def qwen_models():
    """`qwen_models(name)`: {attn: the tiny Qwen-VL model `name` (seed 0, eager and sdpa,
    same weights) with the LLM's query projections scaled by 8 (as `_peaked`), the tower's
    query rows by 100 (at 8 the tiny tower's received attention stays within 0.3% of
    uniform, and a rule ranking it would rank rounding noise) and the final norm's gains
    drawn in [0.5, 1.5) (initialised to ones they would leave cosines unchanged, and a
    rule comparing normed states could not be told from one comparing raw ones)}."""
    def build(name: str) -> dict:
        out = {}
        for attn in ATTNS:
            model = get_spec(name).build(device="cpu", attn_implementation=attn, seed=0).eval()
            norm = model.model.language_model.norm.weight
            with torch.no_grad():
                for block in model.model.visual.blocks:
                    width = block.attn.qkv.in_features  # the fused projection's first third is q
                    block.attn.qkv.weight[:width].mul_(100.0)
                    block.attn.qkv.bias[:width].mul_(100.0)
                for layer in model.model.language_model.layers:
                    layer.self_attn.q_proj.weight.mul_(8.0)
                norm.copy_(0.5 + torch.rand(norm.shape, generator=torch.Generator().manual_seed(7)))
            out[attn] = model
        return out
    return lru_cache(maxsize=None)(build)


@pytest.fixture(scope="session")
def qwen_compiled():
    """`qwen_compiled(policy, model, inputs, rescale_to=None)`: the zoo policy compiled into
    the Qwen-VL model, one forward of `inputs` (the model's keyword arguments); each
    stage's kept tokens as lists (the first prompt: LLM stages give prompt positions,
    `vit.out` merged-token ids in raster order, 1 + the token's index). `rescale_to`: a tiny spec name the
    file's layers are first carried onto (`vtdsl.ir.rescale`), for a file whose layers
    the tiny tower does not have; `logits`: (kept, the last position's logits)."""
    from vtdsl.ir.rescale import rescale
    from vtdsl.lang import parse_file

    def run(policy: str, model, inputs: dict, rescale_to: str | None = None, logits: bool = False):
        source = parse_file(POLICIES / f"{policy}.vt")
        if rescale_to is not None:
            source = rescale(source, get_spec(source.model), get_spec(rescale_to)).policy
        with vc.apply(source, model), torch.no_grad():
            out = model(**inputs).logits[0, -1]
            kept = {k: v[0].tolist() for k, v in vc.kept_tokens(model).items()}
        return (kept, out) if logits else kept
    return run
