"""Train `tiny-llava-vtbench2` on vtbench v2 (issue 22 items 2, 3, 5); v1 stays in `train`.

One command runs the whole recipe (``python examples/train_tiny_vlm2.py``), resumable
with ``--resume`` from the checkpoint written every ``--ckpt-every`` steps. Every step is a
pure function of (seed, step) — its batch, its token dropping — so a resumed run continues
exactly as the uninterrupted one would (`tests/test_vtbench2_train.py`).

1. **Vision phase** (``--vit-steps``): the tower without its unused last layer, trained
   like CLIP's with a CLS objective (multi-label classification of the scene from the
   CLS token of the feature layer: which colour x shape pairs, colours, shapes and sign
   characters are present, and the background pattern) plus v1's patch probes (what
   covers each patch, its region, whether it holds an object's centre). No LLM: about
   15x cheaper per image than a full step.
2. **Full phase** (``--steps``): answer cross-entropy on ``--questions`` questions per
   image, packed as branches behind one image prefix (`train.pack`), with the CLS and
   patch losses alongside. With probability ``--drop-prob`` a batch keeps a random subset
   of the 576 visual tokens (keep ratio uniform in [``--min-keep``, 1]), and of those
   batches a share ``--renumber-prob`` gives the kept tokens contiguous positions
   (renumbered) instead of their own: position alone stops carrying location, as after
   the zoo's renumbering cuts.
3. At the end: val and test accuracy per family and the export (safetensors, tokenizer,
   processor, ``training.json``), as v1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtdsl.eval import bench2
from vtdsl.eval import train as v1
from vtdsl.eval.harness import evaluate, format_result, normalize_uint8
from vtdsl.eval.train import _optimizer, _SkipLastVitLayer, pack

NAME = "tiny-llava-vtbench2"
CHUNK = 512
VIT_OFFSET = 5_000_000  # the vision phase reads train examples from here (the full phase from 0)
PATCH_CLASSES = (["background"] + [f"{c} {s}" for s in bench2.SHAPES for c in bench2.COLOR_NAMES]
                 + [f"sign {c}" for c in bench2.CHARS])
# CLS targets: present colour x shape pairs, colours, shapes, sign characters (multi-label)
# and the background pattern (one of four).
SCENE_LABELS = ([f"{c} {s}" for s in bench2.SHAPES for c in bench2.COLOR_NAMES] + list(bench2.COLOR_NAMES)
                + list(bench2.SHAPES) + [f"sign {c}" for c in bench2.CHARS])


def build_tokenizer():
    """Word-level tokenizer over `bench2.vocabulary()`; hyphenated words stay whole."""
    return v1.build_tokenizer(bench2.vocabulary(), isolate=r"\n|[^\w\s-]", max_length=1024)


def build_processor(tokenizer=None):
    return v1.build_processor(tokenizer or build_tokenizer(), side=bench2.IMAGE_SIZE, patch=bench2.PATCH)


def build_model(seed: int = 0, **text_overrides: int):
    """The registered config (`models.builtins.TINY_LLAVA_VTBENCH2`), random weights."""
    from transformers import LlavaForConditionalGeneration

    from vtdsl.models.builtins import builtin_config_dict
    from vtdsl.models.registry import _config_from_dict

    data = builtin_config_dict(NAME)
    for key, value in text_overrides.items():  # tests shrink the model
        tower, _, name = key.partition("_")
        data[{"text": "text_config", "vision": "vision_config"}[tower]][name] = value
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(_config_from_dict(data))


# --------------------------------------------------------------------------- labels and data


def patch_labels(meta: dict[str, Any]) -> torch.Tensor:
    """(3, 576): what covers each patch centre, its region (0..8), 1 on each object's
    centre patch."""
    side, p = bench2.IMAGE_SIZE // bench2.PATCH, bench2.PATCH
    centre = torch.arange(side) * p + p / 2
    cy, cx = centre.view(-1, 1), centre.view(1, -1)
    labels = torch.zeros(3, side, side, dtype=torch.long)
    for o in meta["objects"]:
        x0, y0, x1, y1 = o["box"]
        name = f"sign {o['char']}" if o["type"] == "sign" else f"{o['color']} {o['shape']}"
        labels[0][(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)] = PATCH_CLASSES.index(name)
        labels[2, min(side - 1, int((y0 + y1) / 2 // p)), min(side - 1, int((x0 + x1) / 2 // p))] = 1
    labels[1] = (torch.arange(side) * 3 // side).view(-1, 1) * 3 + (torch.arange(side) * 3 // side).view(1, -1)
    return labels.flatten(1)


def scene_labels(meta: dict[str, Any]) -> torch.Tensor:
    """Multi-hot over `SCENE_LABELS` followed by the pattern's index."""
    hot = torch.zeros(len(SCENE_LABELS) + 1)
    for o in meta["objects"]:
        names = ([f"sign {o['char']}"] if o["type"] == "sign"
                 else [f"{o['color']} {o['shape']}", o["color"], o["shape"]])
        for n in names:
            hot[SCENE_LABELS.index(n)] = 1
    hot[-1] = bench2.PATTERNS.index(meta["pattern"])
    return hot


def questions_for(ex, k: int, seed: int) -> list[tuple[str, str]]:
    """The example's question, then up to `k - 1` about the same scene: family uniform,
    yes/no balanced, seeded by the example."""
    import random

    rng = random.Random(f"q2-{seed}-{ex.meta['split']}-{ex.meta['index']}")
    pool = [q for q in bench2.scene_questions(ex.meta) if q[1] != ex.question]
    out = [(ex.question, ex.answer)]
    while len(out) < k and pool:
        fam = rng.choice(sorted({f for f, _, _ in pool}))
        cands = [q for q in pool if q[0] == fam]
        want = rng.choice(sorted({a for _, _, a in cands})) if fam in ("exists", "relation") else None
        pick = rng.choice([q for q in cands if want is None or q[2] == want])
        pool.remove(pick)
        out.append((pick[1], pick[2]))
    return out


_ASKED = (  # question template -> which objects hold its answer (attention targets)
    (re.compile(r"(?:Is there a|What size is the|Where is the) (\w+) (\w+)\?"),
     lambda o, m, a: o.get("color") == m[1] and o.get("shape") == m[2]),
    (re.compile(r"What color is the (\w+)\?"), lambda o, m, a: o.get("shape") == m[1]),
    (re.compile(r"Is the (\w+) (\w+) .+ the (\w+) (\w+)\?"),
     lambda o, m, a: (o.get("color"), o.get("shape")) in ((m[1], m[2]), (m[3], m[4]))),
    (re.compile(r"How many (\w+) shapes are there\?"), lambda o, m, a: o["type"] == "shape" and o["color"] == m[1]),
    (re.compile(r"How many (\w+) are there\?"),
     lambda o, m, a: o["type"] == "shape" and bench2.PLURALS[o["shape"]] == m[1]),
    (re.compile(r"What is written on the (\w+) sign\?"), lambda o, m, a: o["type"] == "sign" and o["color"] == m[1]),
    (re.compile(r"Which color is most common\?"), lambda o, m, a: o["type"] == "shape" and o["color"] == a),
)


def asked_patches(meta: dict[str, Any], question: str, answer: str) -> torch.Tensor:
    """(576,) bool: the patches overlapping the objects that hold the answer (none for the
    background pattern and for absent objects)."""
    side, p = bench2.IMAGE_SIZE // bench2.PATCH, bench2.PATCH
    grid = torch.zeros(side, side, dtype=torch.bool)
    for pattern, holds in _ASKED:
        m = pattern.fullmatch(question)
        if m is None:
            continue
        for o in meta["objects"]:
            if holds(o, m, answer):
                x0, y0, x1, y1 = o["box"]
                grid[int(y0 // p):int((y1 - 1) // p) + 1, int(x0 // p):int((x1 - 1) // p) + 1] = True
        break
    return grid.flatten()


def _asked_rows(ex, qa: list[tuple[str, str]], k: int) -> torch.Tensor:
    """(k, 576) bool: `asked_patches` of each question (rows past the scene's questions empty)."""
    rows = torch.zeros(k, (bench2.IMAGE_SIZE // bench2.PATCH) ** 2, dtype=torch.bool)
    for i, (q, a) in enumerate(qa):
        rows[i] = asked_patches(ex.meta, q, a)
    return rows


class Stream:
    """Train examples by index, rendered a chunk at a time (cached on disk if asked)."""

    def __init__(self, tokenizer, questions: int, seed: int, cache_dir: Path | None = None, size: int = CHUNK,
                 pool: int = 0):
        self.tok, self.questions, self.seed, self.cache_dir = tokenizer, questions, seed, cache_dir
        self.size, self.pool = size, pool
        self.chunk: tuple[int, dict] | None = None

    def _render(self, start: int) -> dict:
        name = f"v2a_{start:09d}_{self.size}_q{self.questions}_s{self.seed}.pt"
        path = self.cache_dir / name if self.cache_dir else None
        if path is not None and path.exists():
            return torch.load(path)
        exs = bench2.generate("train", self.size, start)
        qa = [questions_for(e, self.questions, self.seed) for e in exs]
        data = {
            "pixels": torch.from_numpy(np.stack([np.asarray(e.image) for e in exs])).permute(0, 3, 1, 2).contiguous(),
            "qa": qa,
            "patch": torch.stack([patch_labels(e.meta) for e in exs]),
            "scene": torch.stack([scene_labels(e.meta) for e in exs]),
            "asked": torch.stack([_asked_rows(e, q, self.questions) for e, q in zip(exs, qa)]),
        }
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        return data

    def items(self, first: int, n: int) -> dict:
        out: dict[str, list] = {"pixels": [], "qa": [], "patch": [], "scene": [], "asked": []}
        for i in range(first, first + n):
            if self.pool:
                i = i % VIT_OFFSET % self.pool + (VIT_OFFSET if i >= VIT_OFFSET else 0)
            start = i // self.size * self.size
            if self.chunk is None or self.chunk[0] != start:
                self.chunk = (start, self._render(start))
            for key in out:
                out[key].append(self.chunk[1][key][i - start])
        return {k: v if k == "qa" else torch.stack(v) for k, v in out.items()}


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    # The defaults fit 100 minutes on 2 idle CPU cores: the vision phase ~0.8 s a step, the
    # full phase ~4.8 s with all 576 tokens and ~3 s dropping (docs/vtbench.md); a GPU
    # (`--device cuda`) affords more. 32 questions per image cost +37 % over 8 (the 576
    # image tokens dominate a step) for 4x the answer supervision: at 8, 440 steps reached
    # only 23 % val accuracy.
    steps: int = 1300  # full-phase steps
    batch_size: int = 8
    questions: int = 32
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    clip: float = 1.0
    vit_steps: int = 600
    vit_batch_size: int = 32
    vit_lr: float = 2e-3
    cls_weight: float = 0.5  # the CLS objective (alongside VQA too)
    aux_weight: float = 0.5  # the patch probes
    drop_prob: float = 0.5  # share of full-phase batches that drop tokens
    min_keep: float = 0.1  # their keep ratio is uniform in [min_keep, 1]
    renumber_prob: float = 0.5  # share of dropping batches whose kept tokens are renumbered
    # Attention supervision: heads 0..attn_heads-1 of LLM layer attn_layer are pushed to put
    # their attention from each question's last token on the asked objects' patches. Without
    # it the 16-layer LLM stays at the questions' prior (docs/vtbench.md, "training runs").
    attn_weight: float = 1.0
    attn_layer: int = 2
    attn_heads: int = 4
    # Feature alignment (LLaVA's stage 1 in miniature): each projected patch is pulled (cosine)
    # towards the mean word embedding of what covers it ("red circle", "sign k", the pattern).
    align_weight: float = 1.0
    init_tower: str | None = None  # a checkpoint whose tower (and CLS/patch heads) start this run
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    eval_every: int = 260
    val_n: int = 200
    final_n: int = 500
    ckpt_every: int = 50
    chunk: int = CHUNK  # examples rendered at a time
    pool: int = 0  # > 0: cycle over this many train examples (tests)
    out: str = "out/train-tiny-vlm2"
    cache_dir: str | None = None
    export: str | None = None
    resume: bool = False
    model: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine, per phase (the vision phase first, then the full one)."""
    if step < cfg.vit_steps:
        warm = max(1, cfg.vit_steps // 10)
        return cfg.vit_lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / cfg.vit_steps))
    s = step - cfg.vit_steps
    if s < cfg.warmup:
        return cfg.lr * (s + 1) / cfg.warmup
    t = min(1.0, (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def token_plan(cfg: TrainConfig, step: int, batch: int, n: int) -> tuple[torch.Tensor, bool]:
    """(batch, K) sorted indices of the visual tokens a full step keeps, and whether they
    are renumbered; a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    if torch.rand((), generator=g).item() >= cfg.drop_prob:
        return torch.arange(n).expand(batch, n), False
    k = max(1, round(n * (cfg.min_keep + (1 - cfg.min_keep) * torch.rand((), generator=g).item())))
    idx = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(batch)])
    return idx, torch.rand((), generator=g).item() < cfg.renumber_prob


def class_words(tokenizer) -> torch.Tensor:
    """(len(PATCH_CLASSES) + len(PATTERNS), 2) word ids naming each patch class (a colour and
    a shape, or "sign" and the character), then each background pattern (twice)."""
    names = [c.lower().split() for c in PATCH_CLASSES] + [[p, p] for p in bench2.PATTERNS]
    names[0] = ["background", "background"]  # never read: background patches take their pattern
    return torch.tensor([tokenizer.convert_tokens_to_ids(n) for n in names])


class Heads(torch.nn.Module):
    """Training-only heads (not shipped): the CLS objective and the patch probes."""

    def __init__(self, width: int):
        super().__init__()
        self.cls = torch.nn.Linear(width, len(SCENE_LABELS) + len(bench2.PATTERNS))
        self.patch = torch.nn.Linear(width, len(PATCH_CLASSES) + 9 + 2)

    def align_loss(self, projected: torch.Tensor, labels: torch.Tensor, scene: torch.Tensor,
                   embed: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """1 - cos(projected patch, mean embedding of the words naming its content);
        `words` (classes + patterns, 2) holds the word ids of each patch class, then of each
        background pattern (for background patches)."""
        cls = labels[:, 0]  # (B, 576) patch class, 0 = background
        pattern = len(PATCH_CLASSES) + scene[:, -1].long()[:, None].expand_as(cls)
        target = embed.detach()[words[torch.where(cls == 0, pattern, cls)]].mean(-2)
        return (1 - torch.nn.functional.cosine_similarity(projected, target, dim=-1)).mean()

    def cls_loss(self, cls_token: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out, k = self.cls(cls_token), len(SCENE_LABELS)
        return (torch.nn.functional.binary_cross_entropy_with_logits(out[:, :k], target[:, :k])
                + torch.nn.functional.cross_entropy(out[:, k:], target[:, k].long()))

    def patch_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out, k, ce = self.patch(feats), len(PATCH_CLASSES), torch.nn.functional.cross_entropy
        return (ce(out[..., :k].flatten(0, 1), labels[:, 0].flatten())
                + ce(out[..., k:k + 9].flatten(0, 1), labels[:, 1].flatten())
                + ce(out[..., k + 9:].flatten(0, 1), labels[:, 2].flatten()))


def packed_inputs(tokenizer, qa: list, idx: torch.Tensor, renumber: bool, n_image: int) -> dict[str, torch.Tensor]:
    """Rows of question branches behind ``<s> USER: <image>xK \\n`` (K = idx.shape[1]);
    the image slots carry the positions of the tokens they hold unless `renumber`."""
    k = idx.shape[1]
    prefix = tokenizer(bench2.IMAGE_PROMPT_PREFIX.replace("<image>", "<image>" * k))["input_ids"]
    start = prefix.index(tokenizer.convert_tokens_to_ids("<image>"))
    branches = [[tokenizer(f"{q} ASSISTANT:", add_special_tokens=False)["input_ids"] for q, _ in row] for row in qa]
    width = len(prefix) + max(sum(map(len, b)) for b in branches)
    rows, index, labels = [], [], []
    for r, (row_qa, row_br) in enumerate(zip(qa, branches)):
        ids, pos, mask, last = pack(prefix, row_br, width, tokenizer.pad_token_id)
        if not renumber:  # the kept tokens keep their own positions; the text continues after all of them
            pos = torch.where(pos >= start + k, pos + (n_image - k), pos)
            pos[start:start + k] = start + idx[r]
        rows.append((ids, pos, mask))
        index += [(r, p) for p in last]
        labels += tokenizer.convert_tokens_to_ids([a for _, a in row_qa])
    return {"input_ids": torch.stack([x[0] for x in rows]), "position_ids": torch.stack([x[1] for x in rows]),
            "attention_mask": torch.stack([x[2] for x in rows])[:, None], "image_start": start,
            "label_index": torch.tensor(index), "labels": torch.tensor(labels)}


def attention_guide_loss(attn, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                         mask: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, heads: int) -> torch.Tensor:
    """-log of the attention mass heads ``0..heads-1`` of `attn` (a Llama attention module,
    given its input) put on `target` (N, T) from the N query tokens ``rows`` (batch, position),
    under the boolean `mask` (B, 1, T, T); rows without a target do not count. The
    attention is recomputed for those rows only: the layer itself runs its fused kernel."""
    from transformers.models.llama.modeling_llama import rotate_half

    keep = target.any(-1)
    if not bool(keep.any()):
        return hidden.new_zeros(())
    rows, target = rows[keep], target[keep]
    b, t = rows[:, 0], rows[:, 1]
    hd, group = attn.head_dim, attn.num_key_value_groups
    cos, sin = position_embeddings
    q = attn.q_proj(hidden[b, t]).view(len(rows), -1, hd)[:, :heads]
    q = q * cos[b, t][:, None] + rotate_half(q) * sin[b, t][:, None]
    k = attn.k_proj(hidden).view(*hidden.shape[:2], -1, hd)
    k = (k * cos[:, :, None] + rotate_half(k) * sin[:, :, None])[:, :, torch.arange(heads, device=k.device) // group]
    scores = torch.einsum("nhd,nkhd->nhk", q, k[b]) * attn.scaling
    logp = scores.masked_fill(~mask[b, 0, t][:, None], float("-inf")).log_softmax(-1)
    return -logp.masked_fill(~target[:, None], float("-inf")).logsumexp(-1).mean()


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Session:
    """One run: model, heads, optimiser, data, clocks; `step` counts both phases."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.tokenizer = build_tokenizer()
        self.processor = build_processor(self.tokenizer)
        self.device = torch.device(cfg.device)
        self.model = build_model(cfg.seed, **cfg.model).to(self.device)
        self.heads = Heads(self.model.config.vision_config.hidden_size).to(self.device)
        self.opt = _optimizer(self.model, _Decay(cfg.weight_decay, cfg.lr), extra=self.heads)
        self.stream = Stream(self.tokenizer, cfg.questions, cfg.seed, Path(cfg.cache_dir) if cfg.cache_dir else None,
                             cfg.chunk, cfg.pool)
        self.skip_last = _SkipLastVitLayer(self.model)
        self.class_words = class_words(self.tokenizer).to(self.device)
        self.ckpt = Path(cfg.out) / "checkpoint.pt"
        self.step, self.history, self.elapsed, self.cpu = 0, [], 0.0, 0.0
        if cfg.resume and self.ckpt.exists():
            self.load()
        elif cfg.init_tower:
            self.load_tower(cfg.init_tower)

    @property
    def total(self) -> int:
        return self.cfg.vit_steps + self.cfg.steps

    def tower(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.skip_last as feature_layer:
            return self.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[feature_layer]

    def vision_step(self) -> dict[str, float]:
        cfg = self.cfg
        items = self._on_device(self.stream.items(VIT_OFFSET + self.step * cfg.vit_batch_size, cfg.vit_batch_size))
        hidden = self.tower(items["pixels"])
        cls = self.heads.cls_loss(hidden[:, 0], items["scene"])
        aux = self.heads.patch_loss(hidden[:, 1:], items["patch"])
        self._update(cls + aux)
        return {"cls": cls.item(), "aux": aux.item()}

    def full_step(self) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        full = self.step - cfg.vit_steps
        items = self._on_device(self.stream.items(full * cfg.batch_size, cfg.batch_size))
        hidden = self.tower(items["pixels"])
        n = hidden.shape[1] - 1
        idx, renumber = token_plan(cfg, self.step, cfg.batch_size, n)
        batch = self._on_device(packed_inputs(self.tokenizer, items["qa"], idx, renumber, n))
        idx = idx.to(self.device)
        projected = model.model.multi_modal_projector(hidden[:, 1:])
        feats = torch.gather(projected, 1, idx[..., None].expand(-1, -1, projected.shape[-1]))
        table = model.model.language_model.embed_tokens.weight
        align = self.heads.align_loss(projected, items["patch"], items["scene"], table, self.class_words)
        embeds = model.model.language_model.embed_tokens(batch["input_ids"])
        start = batch["image_start"]
        embeds = torch.cat([embeds[:, :start], feats.to(embeds.dtype), embeds[:, start + idx.shape[1]:]], dim=1)
        attn = model.model.language_model.layers[cfg.attn_layer].self_attn
        seen: dict[str, Any] = {}
        hook = attn.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
        try:
            out = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                             position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        finally:
            hook.remove()
        li = batch["label_index"]
        logits = model.lm_head(out[li[:, 0], li[:, 1]])
        answer = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
        cls = self.heads.cls_loss(hidden[:, 0], items["scene"])
        aux = self.heads.patch_loss(hidden[:, 1:], items["patch"])
        asked = torch.cat([torch.gather(items["asked"][r, :len(row)], 1, idx[r].expand(len(row), -1))
                           for r, row in enumerate(items["qa"])])
        target = torch.zeros(len(asked), embeds.shape[1], dtype=torch.bool, device=self.device)
        target[:, start:start + idx.shape[1]] = asked
        guide = attention_guide_loss(attn, seen["hidden_states"], seen["position_embeddings"],
                                     batch["attention_mask"], li, target, cfg.attn_heads)
        self._update(answer + cfg.cls_weight * cls + cfg.aux_weight * aux + cfg.attn_weight * guide
                     + cfg.align_weight * align)
        return {"answer": answer.item(), "cls": cls.item(), "aux": aux.item(), "guide": guide.item(),
                "align": align.item(),
                "kept": idx.shape[1], "renumber": float(renumber)}

    def _on_device(self, data: dict) -> dict:
        """A batch on the training device, pixels normalised (uint8 -> CLIP float)."""
        if "pixels" in data:
            data = {**data, "pixels": normalize_uint8(data["pixels"])}
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}

    def _update(self, loss: torch.Tensor) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.heads.parameters()), self.cfg.clip)
        self.opt.step()

    def run(self, stop_after: int | None = None) -> None:
        """Train to the end (or `stop_after` more steps), checkpointing on the way."""
        cfg = self.cfg
        t0, c0, ema = time.time() - self.elapsed, time.process_time() - self.cpu, {}
        self.model.train()
        end = self.total if stop_after is None else min(self.total, self.step + stop_after)
        while self.step < end:
            losses = self.vision_step() if self.step < cfg.vit_steps else self.full_step()
            self.step += 1
            ema = {k: v if k not in ema else 0.9 * ema[k] + 0.1 * v for k, v in losses.items()}
            self.elapsed, self.cpu = time.time() - t0, time.process_time() - c0
            if self.step % 25 == 0:
                _log(f"step {self.step}/{self.total} " + " ".join(f"{k} {v:.3f}" for k, v in ema.items())
                     + f" {self.elapsed / 60:.1f} min")
            full = self.step - cfg.vit_steps
            if full > 0 and (full % cfg.eval_every == 0 or self.step == self.total):
                self.validate()
            if self.step % cfg.ckpt_every == 0 or self.step in (cfg.vit_steps, self.total):
                self.save()

    def validate(self) -> None:
        res = evaluate(self.model, bench2.generate("val", self.cfg.val_n), self.processor, batch_size=25,
                       progress=False)
        self.history.append({"step": self.step, "minutes": self.elapsed / 60, "val": res["per_family"],
                             "val_overall": res["overall"]})
        _log(f"val@{self.step}: {format_result(res)}")
        self.model.train()

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "heads": self.heads.state_dict(), "optimizer": self.opt.state_dict(),
                "step": self.step, "elapsed": self.elapsed, "cpu": self.cpu, "history": self.history,
                "config": asdict(self.cfg)}

    def save(self) -> None:
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, self.ckpt)

    def load_tower(self, path: str) -> None:
        """Start from another run's tower and CLS/patch heads; the rest stays fresh."""
        state = torch.load(path, weights_only=False, map_location=self.device)  # noqa: S614 (our own checkpoint)
        prefix = "model.vision_tower."
        tower = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        self.model.model.vision_tower.load_state_dict(tower)
        self.heads.load_state_dict(state["heads"])
        _log(f"tower and heads from {path} (its step {state['step']})")

    def load(self) -> None:
        state = torch.load(self.ckpt, weights_only=False, map_location=self.device)  # noqa: S614 (our own checkpoint)
        self.model.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed, self.cpu = state["step"], state["elapsed"], state["cpu"]
        self.history = state["history"]
        _log(f"resumed at step {self.step} ({self.elapsed / 60:.1f} min trained)")


@dataclass
class _Decay:
    """What `train._optimizer` reads of a config."""

    weight_decay: float
    lr: float


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """The whole recipe: both phases (resumable), the final report, the export."""
    torch.set_num_threads(cfg.threads)
    session = Session(cfg)
    n_params = sum(p.numel() for p in session.model.parameters())
    _log(f"model: {n_params / 1e6:.3f} M parameters; config {json.dumps(asdict(cfg))}")
    session.run()
    model = session.model.eval()
    final = {}
    for split in ("val", "test"):
        res = evaluate(model, bench2.generate(split, cfg.final_n), session.processor, batch_size=25, progress=False)
        final[split] = {k: res[k] for k in ("overall", "per_family", "n", "prefill_ms_per_example")}
        _log(f"{split} (n={cfg.final_n}): {format_result(res)}")
    record = {"command": command, "train_minutes": round(session.elapsed / 60, 2),
              "cpu_minutes": round(session.cpu / 60, 2), "steps": session.step, "params": n_params,
              "config": asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": cfg.device, "final": final, "history": session.history}
    export = Path(cfg.export or Path(cfg.out) / "export")
    export.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(export, safe_serialization=True)
    session.processor.save_pretrained(export)
    (export / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    v1.write_reference(model, session.processor, export, bench2)
    _log(f"exported to {export}")
    return record


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train tiny-llava-vtbench2 on vtbench v2 (CPU), resumable.")
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name in ("resume", "model"):
            continue
        default = getattr(d, name)
        kind = type(default) if default is not None else str
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--model", action="append", default=[], metavar="KEY=INT",
                   help="architecture override, e.g. text_num_hidden_layers=2 (repeatable; for tests)")
    a = vars(p.parse_args(argv))
    model = {}
    for kv in a.pop("model"):
        k, v = kv.split("=", 1)
        model[k] = int(v)
    return TrainConfig(**a, model=model)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    train(parse_args(argv), command="python examples/train_tiny_vlm2.py " + shlex.join(argv))
    return 0
