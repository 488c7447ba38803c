"""vtdsl: visual-token reduction policies for vision-language models.

    import vtdsl
    policy = vtdsl.parse("at llm.layer2 keep text top 50%")
    plan = vtdsl.check(policy, "llava-1.5-7b")

Attributes are imported lazily so `vtdsl parse` / `vtdsl fmt` never pay for torch.
"""

from ._lazy import lazy_attributes

__version__ = "0.1.0"

__getattr__, __all__ = lazy_attributes(__name__, {
    "vtdsl.lang": ("parse", "parse_file", "format_policy"),
    "vtdsl.lang.errors": ("PolicyError",),
    "vtdsl.models": ("get_spec",),
    "vtdsl.ir": ("check",),
    "vtdsl.cost": ("estimate",),
    "vtdsl.compiler": ("compile", "apply"),
})
