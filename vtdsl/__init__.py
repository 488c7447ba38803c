"""vtdsl: visual-token reduction policies for vision-language models.

    import vtdsl
    policy = vtdsl.parse("at llm.layer2 keep text top 50%")
    plan = vtdsl.check(policy, "llava-1.5-7b")

Attributes are imported lazily so `vtdsl parse` / `vtdsl fmt` never pay for torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "parse": ("vtdsl.lang", "parse"),
    "parse_file": ("vtdsl.lang", "parse_file"),
    "format_policy": ("vtdsl.lang", "format_policy"),
    "PolicyError": ("vtdsl.lang.errors", "PolicyError"),
    "get_spec": ("vtdsl.models", "get_spec"),
    "check": ("vtdsl.ir", "check"),
    "estimate": ("vtdsl.cost", "estimate"),
    "compile": ("vtdsl.compiler", "compile"),
    "apply": ("vtdsl.compiler", "apply"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'vtdsl' has no attribute {name!r}")
