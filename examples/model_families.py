"""One policy on two model families, three zoo files on nine (CPU, a few seconds).

    python examples/model_families.py

Compiles the same FastV-style policy onto tiny random LLaVA-NeXT (anyres crops) and
Qwen2.5-VL (dynamic resolution, M-RoPE) and generates for images of two sizes each: the
compiled model resolves `top 50%` for the number of visual tokens each image has. Then
prints what `vtdsl check` says about three zoo files on each registered full-size model
(an LLM-side, a CLS-free ViT-side and a CLS-reading method).
"""

from __future__ import annotations

from pathlib import Path

import torch

import vtdsl
import vtdsl.compiler as vc

POLICY = "at llm.layer2 keep text top 50%"
ZOO = Path(__file__).resolve().parent.parent / "policies"
FULL_SIZE = ("llava-1.5-7b", "llava-next-7b", "llava-onevision-qwen2-7b", "qwen2-vl-7b", "qwen2.5-vl-7b",
             "qwen3-vl-8b", "internvl3-8b", "gemma-3-4b", "smolvlm-2.2b")


def llava_next_inputs(spec, height: int, width: int) -> dict:
    """A prompt as LlavaNextProcessor would write it: one placeholder per visual token of
    an image of this size (its crops, unpadded), and the crops' pixels."""
    layout = spec.for_image(height, width)
    ids = torch.tensor([[1, 17, 42] + [spec.image_token_id] * layout.image_tokens + [23, 5]])
    pixels = torch.randn(1, layout.vit_crops, 3, spec.image_size, spec.image_size,
                         generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[height, width]]))


def qwen_inputs(spec, height: int, width: int) -> dict:
    """A Qwen2.5-VL prompt: vision start / end around one placeholder per 2x2 patches."""
    rows, cols = height // spec.patch_size, width // spec.patch_size
    config = spec.config()
    image = config.image_token_id
    ids = torch.tensor([[1, 17, config.vision_start_token_id] + [image] * (rows * cols // 4)
                        + [config.vision_end_token_id, 23, 5]])
    pixels = torch.randn(rows * cols, 3 * 2 * spec.patch_size**2, generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                image_grid_thw=torch.tensor([[1, rows, cols]]), mm_token_type_ids=(ids == image).int())


def main() -> None:
    for name, make_inputs, sizes in (("tiny-llava-next", llava_next_inputs, [(112, 112), (45, 60)]),
                                     ("tiny-qwen2.5-vl", qwen_inputs, [(224, 224), (224, 168)])):
        spec = vtdsl.get_spec(name)
        model = spec.build(device="cpu", seed=0)
        with vc.apply(POLICY, model):
            for height, width in sizes:
                inputs = make_inputs(spec, height, width)
                with torch.no_grad():
                    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
                (site, (n_in, n_out)), = vc.kept_counts(model)["llm"].items()
                print(f"{name:<16} {height}x{width}: {site} kept {n_out} of {n_in} visual tokens; "
                      f"generated {tokens[0, -4:].tolist()}")
    print()
    for model in FULL_SIZE:
        for policy in ("fastv", "hiprune-64", "visionzip"):
            try:
                plan = vtdsl.check(ZOO / f"{policy}.vt", model)
                print(f"{policy:<10} on {model:<24} {plan.visual_tokens_to_llm} visual tokens enter the LLM")
            except vtdsl.PolicyError as err:
                print(f"{policy:<10} on {model:<24} refused: {err.diagnostics[0].message}")


if __name__ == "__main__":
    main()
