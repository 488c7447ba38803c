"""What a model family tells the registry: its transformers classes, module paths,
checkpoint key renames, token layout, and the vision towers and language models it
accepts. One `ModelFamily` per module of this package (`vtdsl.models.families`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ...lang.errors import Diagnostic, PolicyError


def unsupported(message: str, expected: str | None = None, hint: str | None = None) -> PolicyError:
    """The located refusal of a config vtdsl cannot describe."""
    return PolicyError(Diagnostic(message, expected=expected, hint=hint, code="model"))


@dataclass(frozen=True)
class ModelFamily:
    """The spec rules of one transformers `model_type`.

    Attributes
    ----------
    model_type : str
        The config's `model_type` this family reads.
    family : str
        `ModelSpec.family` of its specs (the compiler's family object is chosen by it).
    config_class, model_class : str
        transformers class names.
    vit_layer_path, projector_path, llm_layer_path : str
        Module paths in the transformers 5 model (`{i}`: the layer index).
    checkpoint_renames : tuple of (pattern, replacement)
        Hub key names -> module names; first match wins.
    layout : callable or None
        `layout(config, vision_config) -> dict` of `ModelSpec` fields the token layout
        sets (crops, merger, reference image, ...); None: the plain layout.
    vision_towers : dict
        Vision `model_type` -> {"has_cls", "mlp", "layers", "heads"[, "hidden", "ffn"]}:
        whether the ViT prepends a CLS token, its MLP kind, and the vision config's names
        for depth, heads, width and MLP width (a name, or a function of the config;
        width and MLP width default to `hidden_size` and `intermediate_size`).
    text_models : dict
        Text `model_type` -> {"mlp"}: language models with the Llama layer layout.
    """

    model_type: str
    family: str
    config_class: str
    model_class: str
    vit_layer_path: str
    projector_path: str
    llm_layer_path: str
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    layout: Callable[[Any, Any], dict[str, Any]] | None = None
    vision_towers: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_models: dict[str, dict[str, Any]] = field(default_factory=dict)
