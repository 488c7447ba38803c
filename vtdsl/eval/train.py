"""Train `tiny-llava-vtbench` on vtbench (CPU, seeded). CLI: ``examples/train_tiny_vlm.py``.

- Data: a fresh stream of train-split examples (example ``step * batch + j``; nothing
  repeats unless ``--train-pool`` caps the pool), rendered once per chunk of `CHUNK` into
  uint8 tensors (cached on disk with ``--cache-dir``). The test split is never touched
  except for the final report.
- Questions: each image carries ``--questions`` questions (its own first, then others
  about the same scene from `bench.scene_questions`, family-uniform). They are packed as
  branches behind one shared ``<s> USER: <image>x144\n`` prefix with a 4-D attention
  mask and continued position ids (`pack`), so each branch is scored exactly as the plain
  eval prompt ``USER: <image>\n{question} ASSISTANT:`` would be, while the 144 image
  tokens are run through the LLM once.
- Loss: cross-entropy of the answer token at each branch's last position, plus an
  auxiliary loss (``--aux-weight``; the probe head is not shipped): linear probes on the
  image features (the projector's input) classify each patch's content, its grid cell,
  and whether it holds an object's centre. From scratch on a CPU budget the answer loss
  alone leaves the model at the answer prior for thousands of steps.
- The model's last ViT layer is not needed (vision_feature_layer -2 ignores its output),
  so training runs the tower without it: same function, less compute. Its weights keep
  their initial values; a policy acting there changes nothing, as in LLaVA-1.5.
- AdamW, linear warm-up then cosine decay, gradient clipping; validation on the val split
  every ``--eval-every`` steps; a checkpoint (model + optimiser + step) every
  ``--ckpt-every`` steps in ``--out``; ``--resume`` continues from it.
- At the end: val and test accuracy per family; the model, tokenizer, processor, a
  ``training.json`` record and ``reference.json`` (accuracy and predictions on a fixed
  200-example test slice, checked by the tests) go to ``--export`` (default: the package
  data dir).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtdsl.eval import bench
from vtdsl.eval.harness import evaluate, format_result, normalize_uint8

CHUNK = 2048
# Vision pre-training reads train examples from here on (the full training from 0).
SPLIT_PRETRAIN_OFFSET = 5_000_000
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(words: list[str] | None = None, isolate: str = r"\n|[^\w\s]", max_length: int = 256):
    """A word-level `PreTrainedTokenizerFast` over the vtbench vocabulary (or `words`).

    Lower-cases, splits on spaces, isolates newlines and punctuation (`isolate`; v1:
    ``top-left`` -> ``top - left``), prepends ``<s>``; ``<image>`` is a special token;
    left padding.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + (bench.vocabulary() if words is None else words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(isolate), behavior="isolated"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", model_max_length=max_length,
        extra_special_tokens={"image_token": "<image>"})


def build_image_processor(side: int | None = None):
    """CLIP preprocessing for 96-pixel images, or `side` (resize/crop are no-ops on vtbench)."""
    from vtdsl.models import vtbench as vtm

    try:  # the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as Cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Cls
    side = side or vtm.IMAGE_SIZE
    return Cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
               image_mean=list(vtm.IMAGE_MEAN), image_std=list(vtm.IMAGE_STD), do_convert_rgb=True)


def build_processor(tokenizer=None, side: int | None = None, patch: int | None = None):
    from transformers import LlavaProcessor

    from vtdsl.models import vtbench as vtm

    return LlavaProcessor(image_processor=build_image_processor(side), tokenizer=tokenizer or build_tokenizer(),
                          patch_size=patch or vtm.PATCH_SIZE, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def build_model(tokenizer, seed: int = 0, **overrides: Any):
    from transformers import LlavaForConditionalGeneration

    from vtdsl.models.vtbench import make_config

    config = make_config(
        vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


# --------------------------------------------------------------------------- data


@dataclass
class Chunk:
    start: int
    pixels: torch.Tensor  # uint8 (n, 3, H, W)
    seqs: list[tuple[list[int], list[int], list[int]]]  # (input ids, label positions, label ids)
    patch_labels: torch.Tensor  # int64 (n, patches): what covers each patch centre (aux loss)


# Auxiliary patch classes: 0 background, then shape x colour, then characters.
PATCH_CLASSES = (["background"] + [f"{c} {s}" for s in bench.SHAPES for c in bench.COLOR_NAMES]
                 + [f"char {c}" for c in bench.CHARS])


def patch_labels(meta: dict[str, Any], patch: int = 8) -> torch.Tensor:
    """(2, patches): the object (shape x colour, or character) whose box holds each patch
    centre, and 1 on the one patch holding each object's centre (0 elsewhere)."""
    side = bench.IMAGE_SIZE // patch
    centre = torch.arange(side) * patch + patch / 2
    cy, cx = centre.view(-1, 1), centre.view(1, -1)
    labels = torch.zeros(2, side, side, dtype=torch.long)
    for o in meta["objects"]:
        x0, y0, x1, y1 = o["box"]
        name = f"char {o['char']}" if o["type"] == "char" else f"{o['color']} {o['shape']}"
        inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        labels[0][inside] = PATCH_CLASSES.index(name)
        labels[1, min(side - 1, int((y0 + y1) / 2 // patch)), min(side - 1, int((x0 + x1) / 2 // patch))] = 1
    return labels.flatten(1)


# Relative frequency of each family among the extra questions. `locate` and `read` are
# learnt by mid-training; `color` and near-miss `exists` need the colour bound to its
# shape (attention from the shape word to the shape's patches), which the runs learnt
# last or not at all, and counting is next (docs/vtbench.md).
FAMILY_WEIGHTS = {"color": 2.0, "locate": 1.0, "read": 1.0, "count": 1.5, "exists": 2.0}


def _near_miss(meta: dict[str, Any], question: str) -> bool:
    """Whether an `exists` question's colour or shape (not both) is in the scene."""
    color, shape = question.rstrip("?").split()[-2:]
    return any((o["color"] == color) != (o["shape"] == shape) for o in meta["objects"] if o["type"] == "shape")


def questions_for(ex: bench.Example, k: int) -> list[tuple[str, str]]:
    """The example's own question first, then up to `k - 1` more questions about the same
    scene (family drawn by `FAMILY_WEIGHTS`, yes/no balanced), seeded by the example.
    An extra `exists` question answered "no" names a near miss when the scene has one
    (a present colour or shape), as the benchmark's own "no" questions always do: trivial
    negatives would teach "is the colour there?" instead of the conjunction."""
    rng = random.Random(f"questions-{ex.meta['split']}-{ex.meta['index']}")
    pool = [q for q in bench.scene_questions(ex.meta) if q[1] != ex.question]
    out = [(ex.question, ex.answer)]
    while len(out) < k and pool:
        fams = sorted({f for f, _, _ in pool})
        fam = rng.choices(fams, weights=[FAMILY_WEIGHTS[f] for f in fams])[0]
        cands = [q for q in pool if q[0] == fam]
        if fam == "exists":
            want = rng.choice(sorted({a for _, _, a in cands}))
            cands = [q for q in cands if q[2] == want]
            if want == "no":
                cands = [q for q in cands if _near_miss(ex.meta, q[1])] or cands
        pick = rng.choice(cands)
        pool.remove(pick)
        out.append((pick[1], pick[2]))
    return out


def encode_branches(tokenizer, questions: list[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
    """Token ids of each question's branch (``{question} ASSISTANT:``, what follows the
    shared prefix ``<s> USER: <image>...\n``) and the answer ids."""
    branches = [tokenizer(f"{q} ASSISTANT:", add_special_tokens=False)["input_ids"] for q, _ in questions]
    return branches, tokenizer.convert_tokens_to_ids([a for _, a in questions])


def prefix_ids(tokenizer, image_tokens: int) -> list[int]:
    """``<s> USER: <image>x N \n``: the part of every prompt before the question."""
    ids = tokenizer(bench.prompt("", image_tokens))["input_ids"]
    newline = tokenizer.convert_tokens_to_ids("\n")
    return ids[:len(ids) - ids[::-1].index(newline)]


def pack(prefix: list[int], branches: list[list[int]], width: int, pad_id: int):
    """One row holding a shared prefix and several question branches, for a single forward.

    Every branch attends to the prefix and causally to itself only, and its positions
    continue from the prefix, so the logits at a branch's last token are those of the
    plain prompt ``prefix + branch`` (what the harness evaluates). Padding attends to
    itself only. Returns ids, position ids, a (width, width) bool mask (True = attend)
    and the index of each branch's last token."""
    ids = torch.full((width,), pad_id, dtype=torch.long)
    pos = torch.zeros(width, dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool)
    p = len(prefix)
    ids[:p] = torch.tensor(prefix)
    pos[:p] = torch.arange(p)
    mask[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    at, last = p, []
    for br in branches:
        n = len(br)
        ids[at:at + n] = torch.tensor(br)
        pos[at:at + n] = torch.arange(p, p + n)
        mask[at:at + n, :p] = True
        mask[at:at + n, at:at + n] = torch.ones(n, n, dtype=torch.bool).tril()
        at += n
        last.append(at - 1)
    return ids, pos, mask, last


def render_chunk(tokenizer, start: int, n: int, questions: int, cache_dir: Path | None = None) -> Chunk:
    path = cache_dir / f"train_{start:09d}_{n}_q{questions}.pt" if cache_dir else None
    if path is not None and path.exists():
        d = torch.load(path)
        return Chunk(start, d["pixels"], d["seqs"], d["patch_labels"])
    exs = bench.generate("train", n, start)
    pixels = torch.from_numpy(np.stack([np.asarray(e.image) for e in exs])).permute(0, 3, 1, 2).contiguous()
    seqs = [encode_branches(tokenizer, questions_for(e, questions)) for e in exs]
    labels = torch.stack([patch_labels(e.meta) for e in exs])
    chunk = Chunk(start, pixels, seqs, labels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"pixels": pixels, "seqs": seqs, "patch_labels": labels}, tmp)
        os.replace(tmp, path)
    return chunk


class TrainStream:
    """Batches of train-split examples ``[step*B, (step+1)*B)`` (mod `pool` if set), each
    image with `questions` question branches packed behind one shared prefix."""

    def __init__(self, tokenizer, batch_size: int, image_tokens: int, questions: int = 1,
                 pool: int | None = None, cache_dir: Path | None = None):
        self.tok, self.bs, self.questions = tokenizer, batch_size, questions
        self.prefix = prefix_ids(tokenizer, image_tokens)
        self.pool, self.cache_dir = pool, cache_dir
        self.chunk: Chunk | None = None

    def _example(self, i: int):
        if self.pool:
            i %= self.pool
        start = (i // CHUNK) * CHUNK
        if self.chunk is None or self.chunk.start != start:
            size = min(CHUNK, self.pool - start) if self.pool else CHUNK  # a small pool renders only itself
            self.chunk = render_chunk(self.tok, start, size, self.questions, self.cache_dir)
        j = i - start
        c = self.chunk
        return c.pixels[j], c.seqs[j], c.patch_labels[j]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """``attention_mask`` is a 4-D bool mask (B, 1, S, S); ``label_index`` (k, 2) =
        (row, position) of each scored position, ``labels`` (k,) the answer ids there."""
        items = [self._example(step * self.bs + j) for j in range(self.bs)]
        width = len(self.prefix) + max(sum(map(len, seq[0])) for _, seq, _ in items)
        rows, index, labels = [], [], []
        for r, (_, (branches, answers), _) in enumerate(items):
            rows.append(pack(self.prefix, branches, width, self.tok.pad_token_id))
            index += [(r, p) for p in rows[-1][3]]
            labels += answers
        return {
            "input_ids": torch.stack([x[0] for x in rows]),
            "position_ids": torch.stack([x[1] for x in rows]),
            "attention_mask": torch.stack([x[2] for x in rows])[:, None],
            "pixel_values": normalize_uint8(torch.stack([it[0] for it in items])),
            "label_index": torch.tensor(index), "labels": torch.tensor(labels),
            "patch_labels": torch.stack([it[2] for it in items]),
        }


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    steps: int = 1100
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    clip: float = 1.0
    seed: int = 0
    threads: int = 1
    eval_every: int = 275
    val_n: int = 500
    final_n: int = 2000
    ckpt_every: int = 250
    train_pool: int | None = None
    # Questions per training image, packed as branches behind one shared image prefix
    # (see `pack`): each is scored exactly as the eval prompt, for the cost of ~10 tokens.
    questions: int = 8
    # Auxiliary loss (training only, the head is not shipped): linear probes on the image
    # features (the projector's input) predict what covers each patch and which named cell
    # it lies in. Dense supervision
    # for the vision tower; the answer loss alone learns far more slowly on CPU budgets.
    aux_weight: float = 0.5
    # Steps of vision-tower pre-training on the auxiliary probes alone (no LLM: ~5x
    # cheaper per image), batch `vit_batch_size`, before the full training. Reading the
    # 10x14-pixel glyphs needs the tower to combine several 8-pixel patches; the answer
    # loss alone barely teaches it that.
    vit_steps: int = 500
    vit_batch_size: int = 64
    vit_lr: float = 2e-3
    out: str = "out/train-tiny-vlm"
    cache_dir: str | None = None
    export: str | None = None  # default: package data dir
    resume: bool = False
    model: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _optimizer(model, cfg: TrainConfig, extra=None):
    decay, no_decay = [], []
    named = list(model.named_parameters()) + (list(extra.named_parameters()) if extra else [])
    for name, p in named:
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


class _SkipLastVitLayer:
    """Run the ViT without its last layer and read features from the new last layer:
    identical to vision_feature_layer=-2 on the full tower."""

    def __init__(self, model):
        self.enc = model.model.vision_tower.encoder
        self.layers = self.enc.layers
        assert model.config.vision_feature_layer == -2
        # transformers installs its hidden-state capturing hooks lazily, on the layers
        # present at the first call: make that call with the full tower.
        v = model.config.vision_config
        param = next(model.parameters())
        with torch.no_grad():
            model.model.vision_tower(torch.zeros(1, v.num_channels, v.image_size, v.image_size,
                                                 dtype=param.dtype, device=param.device),
                                     output_hidden_states=True)

    def __enter__(self):
        self.enc.layers = torch.nn.ModuleList(list(self.layers)[:-1])
        # A non-negative index: negative ones are resolved against config.num_hidden_layers.
        return len(self.layers) - 1

    def __exit__(self, *exc):
        self.enc.layers = self.layers


def _aux_loss(aux_head, features, plabels, cell_labels):
    """Sum of the three patch probes' cross-entropies (content, cell, object centre)."""
    aux = aux_head(features)
    k = len(PATCH_CLASSES)
    ce = torch.nn.functional.cross_entropy
    return (ce(aux[..., :k].flatten(0, 1), plabels[:, 0].flatten())
            + ce(aux[..., k:k + 9].flatten(0, 1), cell_labels.repeat(aux.shape[0]))
            + ce(aux[..., k + 9:].flatten(0, 1), plabels[:, 1].flatten()))


def pretrain_vision(model, aux_head, cell_labels, stream: "TrainStream", skip_last, cfg: TrainConfig) -> None:
    """Train the vision tower (all but its unused last layer) and the probes on the
    auxiliary loss alone, on train examples from the end of the stream's range (the
    full training starts at example 0)."""
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vit_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    base = SPLIT_PRETRAIN_OFFSET
    t0 = time.time()
    ema = None
    warm = max(1, cfg.vit_steps // 10)
    for step in range(cfg.vit_steps):
        lr = cfg.vit_lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / cfg.vit_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        items = [stream._example(base + step * cfg.vit_batch_size + j) for j in range(cfg.vit_batch_size)]
        pixels = normalize_uint8(torch.stack([it[0] for it in items]))
        plabels = torch.stack([it[2] for it in items])
        with skip_last as feature_layer:
            hidden = tower(pixels, output_hidden_states=True).hidden_states[feature_layer]
        loss = _aux_loss(aux_head, hidden[:, 1:], plabels, cell_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == cfg.vit_steps:
            dt = time.time() - t0
            _log(f"vit step {step + 1}/{cfg.vit_steps} aux {ema:.4f} lr {lr:.2e} {dt / 60:.1f} min "
                 f"({(step + 1) * cfg.vit_batch_size / dt:.1f} img/s)")
    _log("vision probes on 200 val images: " + ", ".join(
        f"{k} {v:.1%}" for k, v in probe_accuracy(model, aux_head, skip_last).items()))


@torch.no_grad()
def probe_accuracy(model, aux_head, skip_last, n: int = 200) -> dict[str, float]:
    """Accuracy of the content probe on val patches covered by a character / a shape."""
    exs = bench.generate("val", n)
    pixels = torch.from_numpy(np.stack([np.asarray(e.image) for e in exs])).permute(0, 3, 1, 2)
    labels = torch.stack([patch_labels(e.meta) for e in exs])[:, 0]
    with skip_last as feature_layer:
        hidden = model.model.vision_tower(normalize_uint8(pixels), output_hidden_states=True).hidden_states[feature_layer]
    pred = aux_head(hidden[:, 1:])[..., :len(PATCH_CLASSES)].argmax(-1)
    is_char = labels >= PATCH_CLASSES.index(f"char {bench.CHARS[0]}")
    is_shape = (labels > 0) & ~is_char
    return {"char patches": (pred[is_char] == labels[is_char]).float().mean().item(),
            "shape patches": (pred[is_shape] == labels[is_shape]).float().mean().item()}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, cfg.seed, **cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model: {n_params / 1e6:.3f} M parameters; config {json.dumps(asdict(cfg))}")
    session = _Session.create(cfg, model, tokenizer, out / "checkpoint.pt")
    session.run()
    train_minutes, cpu_minutes = session.minutes()
    _log(f"training done: {session.step} steps, {train_minutes:.1f} min wall, {cpu_minutes:.1f} min CPU")

    model.eval()
    final = {}
    for split in ("val", "test"):
        res = evaluate(model, bench.generate(split, cfg.final_n), processor, batch_size=64, progress=False)
        final[split] = {k: res[k] for k in ("overall", "per_family", "n", "prefill_ms_per_example")}
        _log(f"{split} (n={cfg.final_n}): {format_result(res)}")
    record = {
        "command": command, "train_minutes": round(train_minutes, 2), "cpu_minutes": round(cpu_minutes, 2),
        "steps": session.step, "examples_seen": session.step * cfg.batch_size, "params": n_params,
        "config": asdict(cfg), "torch": torch.__version__, "final": final, "history": session.history,
    }
    export = Path(cfg.export) if cfg.export else None
    if export is None:
        from vtdsl.models.vtbench import DATA_DIR
        export = DATA_DIR
    export_model(model, processor, export, record)
    _log(f"exported to {export}")
    return record


def _patch_probes(model) -> tuple[torch.nn.Linear, torch.Tensor]:
    """The auxiliary head and each patch's cell label. Three probes on each patch feature:
    what covers it, which of the 9 named cells it is in, and whether it holds an object's
    centre (one patch per object: size-free counting)."""
    aux_head = torch.nn.Linear(model.config.vision_config.hidden_size, len(PATCH_CLASSES) + 9 + 2)
    side = bench.IMAGE_SIZE // model.config.vision_config.patch_size
    rc = torch.arange(side) * bench.GRID // side
    return aux_head, (rc.view(-1, 1) * bench.GRID + rc.view(1, -1)).flatten()


@dataclass(eq=False)
class _Session:
    """One training run: what its steps share, its progress (restored from a checkpoint
    on resume) and its clocks (wall and CPU time, counted across resumes)."""

    cfg: TrainConfig
    model: Any
    tokenizer: Any
    aux_head: torch.nn.Linear
    cell_labels: torch.Tensor
    opt: Any
    stream: TrainStream
    val: list
    ckpt: Path
    skip_last: _SkipLastVitLayer | None = None
    step: int = 0
    history: list = field(default_factory=list)
    t_start: float = 0.0
    cpu_start: float = 0.0

    @classmethod
    def create(cls, cfg: TrainConfig, model, tokenizer, ckpt: Path) -> "_Session":
        """Set up the run, then pre-train the vision tower (a fresh run) or load the
        checkpoint (`cfg.resume`)."""
        aux_head, cell_labels = _patch_probes(model)
        opt = _optimizer(model, cfg, extra=aux_head)
        stream = TrainStream(tokenizer, cfg.batch_size, model.config.image_seq_length, cfg.questions, cfg.train_pool,
                             Path(cfg.cache_dir) if cfg.cache_dir else None)
        session = cls(cfg, model, tokenizer, aux_head, cell_labels, opt, stream, bench.generate("val", cfg.val_n), ckpt)
        resumed = cfg.resume and ckpt.exists()
        session.skip_last = _SkipLastVitLayer(model)
        elapsed = cpu_done = 0.0
        if cfg.vit_steps and not resumed:
            t0, c0 = time.time(), time.process_time()
            pretrain_vision(model, aux_head, cell_labels, stream, session.skip_last, cfg)
            elapsed, cpu_done = time.time() - t0, time.process_time() - c0  # counted in the budget
            session.opt = _optimizer(model, cfg, extra=aux_head)  # fresh moments for the full model
        if resumed:
            elapsed, cpu_done = session.load()
        torch.manual_seed(cfg.seed + session.step)
        session.t_start = time.time() - elapsed
        session.cpu_start = time.process_time() - cpu_done
        return session

    def load(self) -> tuple[float, float]:
        """Restore the checkpoint; the wall and CPU seconds it had trained."""
        state = torch.load(self.ckpt, weights_only=False)  # noqa: S614 (our own checkpoint)
        self.model.load_state_dict(state["model"])
        self.aux_head.load_state_dict(state["aux_head"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, elapsed, self.history = state["step"], state["elapsed"], state["history"]
        _log(f"resumed at step {self.step} ({elapsed / 60:.1f} min trained)")
        return elapsed, state.get("cpu", 0.0)

    def minutes(self) -> tuple[float, float]:
        return (time.time() - self.t_start) / 60, (time.process_time() - self.cpu_start) / 60

    def run(self) -> None:
        """Train to `cfg.steps`, logging, validating and checkpointing on the way."""
        cfg = self.cfg
        loss_ema = aux_ema = None
        captured: dict[str, torch.Tensor] = {}
        hook = self.model.model.multi_modal_projector.register_forward_hook(
            lambda mod, args, out: captured.__setitem__("features", args[0]))
        self.model.train()
        while self.step < cfg.steps:
            answer_loss, aux_loss = self.train_step(captured)
            self.step += 1
            step = self.step
            loss_ema = answer_loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * answer_loss.item()
            if aux_loss is not None:
                aux_ema = aux_loss.item() if aux_ema is None else 0.95 * aux_ema + 0.05 * aux_loss.item()
            if step % 25 == 0:
                dt = time.time() - self.t_start
                _log(f"step {step}/{cfg.steps} loss {loss_ema:.4f} aux {aux_ema or 0:.4f} "
                     f"lr {lr_at(step - 1, cfg):.2e} {dt / 60:.1f} min ({step * cfg.batch_size / dt:.1f} ex/s)")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                self.validate(loss_ema)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                self.save()
        hook.remove()

    def train_step(self, captured: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimiser step on batch `step`: the answer loss and the auxiliary loss."""
        cfg = self.cfg
        batch = self.stream.batch(self.step)
        labels = batch.pop("labels")
        label_index = batch.pop("label_index")
        plabels = batch.pop("patch_labels")
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        with self.skip_last as feature_layer:
            logits = self.model(**batch, vision_feature_layer=feature_layer, use_cache=False).logits
        logits = logits[label_index[:, 0], label_index[:, 1]]
        answer_loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss, aux_loss = answer_loss, None
        if cfg.aux_weight > 0:
            aux_loss = _aux_loss(self.aux_head, captured.pop("features"), plabels, self.cell_labels)
            loss = loss + cfg.aux_weight * aux_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.opt.step()
        return answer_loss, aux_loss

    def validate(self, loss_ema: float) -> None:
        res = evaluate(self.model, self.val, self.tokenizer, batch_size=64, progress=False)
        wall, cpu = self.minutes()
        self.history.append({"step": self.step, "minutes": wall, "cpu_minutes": cpu,
                             "loss": loss_ema, "val": res["per_family"], "val_overall": res["overall"]})
        _log(f"val@{self.step}: {format_result(res)}")
        self.model.train()

    def save(self) -> None:
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "aux_head": self.aux_head.state_dict(),
                    "optimizer": self.opt.state_dict(), "step": self.step, "elapsed": time.time() - self.t_start,
                    "cpu": time.process_time() - self.cpu_start, "history": self.history,
                    "config": asdict(self.cfg)}, tmp)
        os.replace(tmp, self.ckpt)


def export_model(model, processor, path: Path, record: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    (path / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    write_reference(model, processor, path)


REFERENCE = {"split": "test", "start": 0, "n": 200, "tolerance": 0.02, "family_tolerance": 0.05}


def write_reference(model, processor, path: Path, benchmark=bench) -> dict[str, Any]:
    """Record the unpruned accuracy and predictions on a fixed 200-example test slice of
    `benchmark` (v1's `bench` or v2's `bench2`); the tests check the shipped model against it."""
    ref = dict(REFERENCE)
    exs = benchmark.generate(ref["split"], ref["n"], start=ref["start"])
    res = evaluate(model, exs, processor, batch_size=50, progress=False, return_predictions=True)
    ref.update(overall=res["overall"], per_family=res["per_family"], predictions=res["predictions"],
               torch=torch.__version__)
    (path / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    return ref


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train tiny-llava-vtbench on vtbench (CPU).")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (shared machine: 1)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--val-n", type=int, default=d.val_n)
    p.add_argument("--final-n", type=int, default=d.final_n)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--aux-weight", type=float, default=d.aux_weight,
                   help="weight of the auxiliary patch-classification loss (0: answer loss only)")
    p.add_argument("--vit-steps", type=int, default=d.vit_steps,
                   help="vision-tower pre-training steps on the probes alone, before the full training")
    p.add_argument("--vit-batch-size", type=int, default=d.vit_batch_size)
    p.add_argument("--vit-lr", type=float, default=d.vit_lr)
    p.add_argument("--questions", type=int, default=d.questions, help="questions per training image")
    p.add_argument("--train-pool", type=int, default=None, help="cycle over this many train examples")
    p.add_argument("--out", default=d.out, help="checkpoints and logs")
    p.add_argument("--cache-dir", default=None, help="cache rendered train chunks here")
    p.add_argument("--export", default=None, help="where to write the trained model (default: package data)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--model", action="append", default=[], metavar="KEY=INT",
                   help="architecture override, e.g. text_hidden_size=128 (repeatable)")
    a = p.parse_args(argv)
    model = {}
    for kv in a.model:
        k, v = kv.split("=", 1)
        model[k] = int(v)
    return TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                       weight_decay=a.weight_decay, seed=a.seed, threads=a.threads,
                       eval_every=a.eval_every, val_n=a.val_n, final_n=a.final_n,
                       ckpt_every=a.ckpt_every, train_pool=a.train_pool, aux_weight=a.aux_weight, questions=a.questions,
                       vit_steps=a.vit_steps, vit_batch_size=a.vit_batch_size, vit_lr=a.vit_lr, out=a.out,
                       cache_dir=a.cache_dir, export=a.export, resume=a.resume, model=model)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    train(cfg, command="python examples/train_tiny_vlm.py " + shlex.join(argv))
    return 0
