"""Which vtbench a model answers: v1's 96-pixel scenes or v2's 192-pixel ones.

A vtbench model is trained on one generator, whose images it takes at its own input
size (v1: 96 pixels, 12x12 patches; v2: 192 pixels, 24x24), so the input size names the
benchmark — for the shipped models and for a user's retrained export alike.

    from vtdsl.eval.suites import bench_for
    bench = bench_for(spec)          # vtdsl.eval.bench or vtdsl.eval.bench2
    examples = bench.generate("val", 200)
"""

from __future__ import annotations

from types import ModuleType

from ..lang.errors import Diagnostic, PolicyError


def bench_for(spec) -> ModuleType:
    """The generator module (`bench` or `bench2`) whose scenes `spec`'s model reads."""
    from . import bench, bench2

    by_size = {bench.IMAGE_SIZE: bench, bench2.IMAGE_SIZE: bench2}
    module = by_size.get(spec.image_size)
    if module is None:
        raise PolicyError(Diagnostic(
            f"model '{spec.name}' takes {spec.image_size}-pixel images, which no vtbench draws", None,
            expected=f"a vtbench model: {bench.IMAGE_SIZE} pixels (v1) or {bench2.IMAGE_SIZE} (v2)",
            hint="score other models on your own examples with --data FILE", code="model"))
    return module
