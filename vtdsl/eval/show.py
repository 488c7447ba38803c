"""Pictures of what a policy keeps: the image, then per stage the patch grid coloured by
kept / merged / dropped, and the stage's score heat-map where it has one.

Drawn with PIL as flat colour cells (no anti-aliasing), so a picture can be checked by
counting pixels: every cell is `CELL` x `CELL` pixels of exactly one colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

CELL = 16  # pixels per patch cell
GAP = 8
HEADER = 28
KEPT = (0, 170, 0)
MERGED = (255, 150, 0)
DROPPED = (70, 70, 70)
GONE = (20, 20, 20)  # removed by an earlier stage
BACKGROUND = (255, 255, 255)
STATUS_COLOURS = {"kept": KEPT, "merged": MERGED, "dropped": DROPPED, "gone": GONE}


def stage_status(stage, inputs: torch.Tensor, outputs: torch.Tensor, cells: int) -> list[str]:
    """Status of each raster patch cell at one stage of one image. `inputs` / `outputs` are
    the `vid`s (1 + raster index; 0 is CLS) of the tokens the stage saw and handed on; a
    merged token carries its target's vid, so its sources read as merged."""
    seen = {int(v) - 1 for v in inputs.tolist() if v > 0}
    out = {int(v) - 1 for v in outputs.tolist() if v > 0}
    merges = stage.action in ("merge", "pool") or (stage.rest is not None and stage.rest.merges)
    absorbed = "merged" if merges else "dropped"
    return ["gone" if c not in seen else "kept" if c in out else absorbed for c in range(cells)]


def _heat(values: list[float]) -> list[tuple[int, int, int]]:
    """Scores to colours (matplotlib's viridis), min-max normalised."""
    from matplotlib import colormaps

    lo, hi = min(values), max(values)
    cmap = colormaps["viridis"]
    out = []
    for v in values:
        r, g, b, _ = cmap(0.0 if hi <= lo else (v - lo) / (hi - lo))
        out.append((round(255 * r), round(255 * g), round(255 * b)))
    return out


def record_stages(plan, model, processor, spec, image, question: str) -> list[dict[str, Any]]:
    """Run one prompt through the compiled model and return, per stage in order, its key,
    the cell statuses of image 0 and its scores per cell (None where unscored)."""
    from .. import compiler
    from .harness import encode_prompts, images_to_pixels

    tok = getattr(processor, "tokenizer", processor)
    cells = spec.grid[0] * spec.grid[1]
    with compiler.apply(plan, model, spec=spec):
        handle = compiler.compiled(model)
        handle.log.record = True
        inputs = encode_prompts(tok, [question], spec.image_tokens)
        inputs["pixel_values"] = images_to_pixels([image], getattr(processor, "image_processor", None))
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1, use_cache=False)
        log = handle.log
        stages = []
        for stage in plan.stages:
            key = f"{stage.site.text()}#{stage.index}"
            if key not in log.inputs:
                continue
            ins, outs = log.inputs[key][0], log.outputs[key][0]
            status = stage_status(stage, ins, outs, cells)
            scores = None
            if key in log.scores:
                by_cell = {int(v) - 1: float(s) for v, s in zip(ins.tolist(), log.scores[key][0].tolist()) if v > 0}
                scores = [by_cell.get(c) for c in range(cells)]
            stages.append({"key": key, "text": stage.site.text(), "status": status, "scores": scores,
                           "kept": status.count("kept")})
    return stages


def render(image: Image.Image, stages: list[dict[str, Any]], grid: tuple[int, int], title: str = "") -> Image.Image:
    """The picture: the image, then per stage a status grid and (if scored) a heat map."""
    rows, cols = grid
    w, h = cols * CELL, rows * CELL
    panels: list[tuple[str, Image.Image]] = [("image", image.convert("RGB").resize((w, h), Image.NEAREST))]
    for st in stages:
        status = Image.new("RGB", (w, h), BACKGROUND)
        draw = ImageDraw.Draw(status)
        for c, s in enumerate(st["status"]):
            r, k = divmod(c, cols)
            draw.rectangle([k * CELL, r * CELL, (k + 1) * CELL - 1, (r + 1) * CELL - 1], fill=STATUS_COLOURS[s])
        panels.append((f"{st['text']}: {st['kept']} kept", status))
        if st["scores"] is not None:
            heat = Image.new("RGB", (w, h), GONE)
            draw = ImageDraw.Draw(heat)
            known = [v for v in st["scores"] if v is not None]
            colours = iter(_heat(known)) if known else iter(())
            for c, v in enumerate(st["scores"]):
                if v is None:
                    continue
                r, k = divmod(c, cols)
                draw.rectangle([k * CELL, r * CELL, (k + 1) * CELL - 1, (r + 1) * CELL - 1], fill=next(colours))
            panels.append((f"{st['text']}: score", heat))
    out = Image.new("RGB", (len(panels) * (w + GAP) + GAP, h + HEADER + GAP), BACKGROUND)
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((GAP, 2), title, fill=(0, 0, 0))
    for i, (label, panel) in enumerate(panels):
        x = GAP + i * (w + GAP)
        draw.text((x, HEADER - 13), label, fill=(0, 0, 0))
        out.paste(panel, (x, HEADER))
    return out


def show(plan, model, processor, spec, image, question: str, path: str | Path) -> list[dict[str, Any]]:
    """Write the picture of `plan` on `image` to `path` (PNG); return the stage records."""
    stages = record_stages(plan, model, processor, spec, image, question)
    title = f"{plan.policy.name or 'policy'} on {spec.name}: {question}"
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    render(image, stages, spec.grid, title).save(tmp, format="PNG")
    tmp.replace(path)  # never leave a half-written picture behind
    return stages
