"""The compiler's Python API end to end on tiny-llava (CPU, a few seconds).

    python examples/compile_llava.py

Builds the tiny random LLaVA, compiles a two-stage policy onto it (VisionZip-style
dominant + contextual tokens after the ViT, then FastV-style pruning inside the LLM),
generates, and prints what was kept, the KV-cache lengths and the cost report.
"""

from __future__ import annotations

import torch

import vtdsl
import vtdsl.compiler as vc

POLICY = """
policy "example"
at vit.out keep cls top 54 then merge rest into 10
at llm.layer2 keep text top 50%
"""


def main() -> None:
    spec = vtdsl.get_spec("tiny-llava")
    model = spec.build(device="cpu", attn_implementation="sdpa", seed=0).eval()
    plan = vtdsl.check(vtdsl.parse(POLICY), spec)

    # The prompt as a processor would write it: 576 placeholders for the image. The
    # compiled model shortens the run to the policy's count by itself.
    image = spec.image_token_id
    input_ids = torch.tensor([[1, 17, 42] + [image] * spec.image_tokens + [23, 5, 9]])
    pixel_values = torch.randn(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        baseline = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)

    vc.compile(plan, model)  # in place; vc.uncompile(model) undoes it
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
        tokens = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)

    print(vc.compiled(model).listing.text().split("\nrewrites")[0])
    print("kept per stage (in -> out per image):")
    for tower, sites in vc.kept_counts(model).items():
        for site, (n_in, n_out) in sites.items():
            print(f"  {site:<16} {n_in:>4} -> {n_out}")
    lengths = [out.cache.layers[j].keys.shape[-2] for j in range(spec.llm.layers)]
    print(f"KV-cache length per LLM layer: {lengths}")
    print(f"generated (baseline): {baseline[0, -8:].tolist()}")
    print(f"generated (compiled): {tokens[0, -8:].tolist()}")
    text_tokens = int((input_ids != image).sum())
    print()
    print(vtdsl.estimate(plan, text_tokens=text_tokens).summary())
    vc.uncompile(model)


if __name__ == "__main__":
    main()
