"""Model registry: names and local directories -> `ModelSpec`, through one code path.

Every spec, built-in or not, is made by `spec_from_config` from a transformers config, so
the figures the cost model and the compiler use are the ones transformers builds.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from typing import Any, Callable

from ..lang.errors import Diagnostic, PolicyError, did_you_mean
from .builtins import ALIASES, BUILTINS, builtin_config_dict, shipped_spec
from .spec import DTYPE_BYTES, ModelSpec, TowerDims

# Hub checkpoints (llava-hf, and transformers 4.x/5.x save_pretrained) name keys
# `language_model.model.*`, `vision_tower.vision_model.*`, ...; transformers 5 modules are
# `model.language_model.*`, `model.vision_tower.*` (no vision_model). First match wins.
_LLAVA_RENAMES = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.", "model.language_model."),
)

# Family data, keyed by the config's model_type. Adding LLaVA-NeXT or Qwen2.5-VL means
# adding a row here (and the fields the row sets), not branching elsewhere.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llava": {
        "family": "llava",
        "config_class": "LlavaConfig",
        "model_class": "LlavaForConditionalGeneration",
        "vit_layer_path": "model.vision_tower.encoder.layers.{i}",
        "projector_path": "model.multi_modal_projector",
        "llm_layer_path": "model.language_model.layers.{i}",
        "checkpoint_renames": _LLAVA_RENAMES,
    },
    "llava_next": {
        "family": "llava-next",
        "config_class": "LlavaNextConfig",
        "model_class": "LlavaNextForConditionalGeneration",
        "vit_layer_path": "model.vision_tower.encoder.layers.{i}",
        "projector_path": "model.multi_modal_projector",
        "llm_layer_path": "model.language_model.layers.{i}",
        # llava-hf/llava-v1.6-* checkpoints: the LLaVA-1.5 key layout plus the newline vector
        "checkpoint_renames": ((r"^image_newline$", "model.image_newline"),) + _LLAVA_RENAMES,
    },
    "qwen2_5_vl": {
        "family": "qwen2.5-vl",
        "config_class": "Qwen2_5_VLConfig",
        "model_class": "Qwen2_5_VLForConditionalGeneration",
        "vit_layer_path": "model.visual.blocks.{i}",
        "projector_path": "model.visual.merger",
        "llm_layer_path": "model.language_model.layers.{i}",
        # Qwen/Qwen2.5-VL-* hub checkpoints: `visual.*`, `model.*` (text), `lm_head.*`.
        "checkpoint_renames": (
            (r"^visual\.", "model.visual."),
            (r"^model\.(?!visual\.|language_model\.)", "model.language_model."),
        ),
    },
}


def _anyres_layout(config, vc) -> dict[str, Any]:
    """LLaVA-NeXT: counts are for the largest pinpoint (ties: the first listed), the most
    tokens an image can take; each pinpoint side is a whole number of crops."""
    side = vc.image_size
    pinpoints = [tuple(p) for p in (getattr(config, "image_grid_pinpoints", None) or ())]
    if not pinpoints:
        raise _unsupported("a llava_next config without image_grid_pinpoints",
                           expected="image_grid_pinpoints such as [[336, 672], [672, 336], [672, 672]]")
    height, width = max(pinpoints, key=lambda p: p[0] * p[1])
    if height % side or width % side:
        raise _unsupported(f"pinpoint {height}x{width} is not a whole number of {side}-pixel crops")
    grid = (height // side, width // side)
    return {"anyres_grid": grid, "vit_crops": 1 + grid[0] * grid[1], "image_newline": True,
            "anyres_pinpoints": tuple(pinpoints)}


def _qwen_layout(config, vc) -> dict[str, Any]:
    """Qwen2.5-VL: dynamic resolution, so counts are for `vtdsl_reference_image` (a key
    vtdsl adds to the config; 672x672 when absent); features are the last block's output,
    merged 2x2 by the merger, which is the projector here."""
    height, width = tuple(getattr(config, "vtdsl_reference_image", None) or (672, 672))
    merge = vc.spatial_merge_size
    unit = vc.patch_size * merge
    if height != width or height % unit:
        raise _unsupported(f"reference image {height}x{width}: vtdsl needs a square side that is a multiple of "
                           f"{unit} pixels (patch {vc.patch_size} x merge {merge})")
    window = vc.window_size // vc.patch_size
    if window % merge or (height // vc.patch_size) % window:
        raise _unsupported(f"a {vc.window_size}-pixel attention window does not tile a {height}-pixel image")
    wide = vc.hidden_size * merge * merge
    return {
        "image_size": height,
        "channels": vc.in_channels,
        "vision_feature_layer": -1,
        "select_strategy": "default",
        "projector": (wide, wide, vc.out_hidden_size),
        "spatial_merge": merge,
        "temporal_patch": vc.temporal_patch_size,
        "vit_window": window * window,
        "vit_full_attention": tuple(vc.fullatt_block_indexes),
        "position_encoding": "mrope",
        "dynamic_resolution": True,
    }


_LAYOUTS: dict[str, Callable[[Any, Any], dict[str, Any]]] = {"llava_next": _anyres_layout, "qwen2_5_vl": _qwen_layout}

# Vision towers: whether the ViT prepends a CLS token, its MLP kind, and the config's
# names for its depth and head count.
_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "clip_vision_model": {"has_cls": True, "mlp": "gelu", "layers": "num_hidden_layers", "heads": "num_attention_heads"},
    "qwen2_5_vl_vision": {"has_cls": False, "mlp": "swiglu", "layers": "depth", "heads": "num_heads"},
}

# Language models with the Llama layer layout (q/k/v/o, gate/up/down, RMSNorm).
_TEXT_MODELS: dict[str, dict[str, Any]] = {
    "llama": {"mlp": "swiglu"},
    "mistral": {"mlp": "swiglu"},
    "qwen2": {"mlp": "swiglu"},
    "qwen2_5_vl_text": {"mlp": "swiglu"},
}


def _unsupported(message: str, expected: str | None = None, hint: str | None = None) -> PolicyError:
    return PolicyError(Diagnostic(message, expected=expected, hint=hint, code="model"))


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text[len("torch.") :] if text.startswith("torch.") else text


def _config_from_dict(data: dict):
    model_type = data.get("model_type")
    if model_type not in _FAMILIES:
        raise _unsupported(
            f"unsupported model type {model_type!r}",
            expected="a model type vtdsl knows: " + ", ".join(sorted(_FAMILIES)),
            hint=did_you_mean(str(model_type), _FAMILIES),
        )
    import transformers

    cls = getattr(transformers, _FAMILIES[model_type]["config_class"])
    return cls.from_dict(copy.deepcopy(data))


def spec_from_config(
    config: Any,
    name: str | None = None,
    description: str | None = None,
    source: str | None = None,
) -> ModelSpec:
    """A `ModelSpec` from a transformers config.

    `config` may be a `LlavaConfig`, a model that has one (`LlavaForConditionalGeneration`),
    or a `config.json` dictionary. Unsupported architectures raise `PolicyError`.
    """
    config, make_config = _config_and_factory(config)
    fam = _FAMILIES[config.model_type]
    vc, tc = config.vision_config, config.text_config
    tower = _supported_parts(vc, tc)
    layout = _LAYOUTS[config.model_type](config, vc) if config.model_type in _LAYOUTS else {}
    feature_layer, strategy = _feature_selection(config, layout)
    vit, llm = _tower_dims(vc, tc, tower)
    if not -vit.layers - 1 <= feature_layer <= vit.layers:
        raise _unsupported(f"vision_feature_layer {feature_layer} is outside a {vit.layers}-layer vision tower")
    dtype = _dtype_name(getattr(config, "dtype", None)) or _dtype_name(getattr(tc, "dtype", None)) or "float32"
    if dtype not in DTYPE_BYTES:
        raise _unsupported(f"unsupported dtype {dtype!r}", expected=", ".join(DTYPE_BYTES))

    if name is None:
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or "custom"
    if description is None:
        description = (
            f"{fam['family']}: {vc.model_type} {vit.layers}L/{vit.hidden} + "
            f"{tc.model_type} {llm.layers}L/{llm.hidden}"
        )
    fields: dict[str, Any] = dict(
        image_size=getattr(vc, "image_size", None),
        channels=getattr(vc, "num_channels", 3),
        projector=(vit.hidden, llm.hidden, llm.hidden),
    )
    fields.update(layout)
    fields.update(vision_feature_layer=feature_layer, select_strategy=strategy)
    return ModelSpec(
        name=name,
        family=fam["family"],
        description=description,
        vit=vit,
        llm=llm,
        vocab_size=tc.vocab_size,
        patch_size=vc.patch_size,
        has_cls=tower["has_cls"],
        dtype=dtype,
        vit_layer_path=fam["vit_layer_path"],
        projector_path=fam["projector_path"],
        llm_layer_path=fam["llm_layer_path"],
        make_config=make_config,
        model_class=fam["model_class"],
        attn_implementation="sdpa",
        checkpoint_renames=fam["checkpoint_renames"],
        source=source,
        **_token_facts(config, tc),
        **fields,
    )


def _config_and_factory(config: Any) -> tuple[Any, Callable[[], Any]]:
    """The transformers config of `config` (a config, a model, or a config.json dict) and
    a factory of fresh copies, frozen now so later edits to the caller's object do not leak
    into the spec."""
    if isinstance(config, dict):
        data = copy.deepcopy(config)

        def make_config(data=data):
            return _config_from_dict(data)

        return _config_from_dict(data), make_config
    config = getattr(config, "config", config)  # a model -> its config
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise _unsupported(
            f"unsupported model type {model_type!r}",
            expected="a model type vtdsl knows: " + ", ".join(sorted(_FAMILIES)),
        )
    frozen = copy.deepcopy(config)

    def make_config(frozen=frozen):
        return copy.deepcopy(frozen)

    return config, make_config


def _supported_parts(vc, tc) -> dict[str, Any]:
    """The `_VISION_TOWERS` row of the vision tower, once both towers are known ones."""
    if vc.model_type not in _VISION_TOWERS:
        raise _unsupported(
            f"unsupported vision tower {vc.model_type!r}",
            expected="one of: " + ", ".join(sorted(_VISION_TOWERS)),
        )
    if tc.model_type not in _TEXT_MODELS:
        raise _unsupported(
            f"unsupported language model {tc.model_type!r}",
            expected="one of: " + ", ".join(sorted(_TEXT_MODELS)),
        )
    return _VISION_TOWERS[vc.model_type]


def _feature_selection(config, layout: dict[str, Any]) -> tuple[int, str]:
    """The ViT layer whose output feeds the projector, and which of its tokens do (the
    family layout's values first, then the config's)."""
    feature_layer = layout.get("vision_feature_layer", getattr(config, "vision_feature_layer", None))
    if not isinstance(feature_layer, int):
        raise _unsupported(
            f"vision_feature_layer {feature_layer!r}: multi-layer image features are not supported",
            expected="a single layer index such as -2",
        )
    strategy = layout.get("select_strategy", getattr(config, "vision_feature_select_strategy", None))
    if strategy not in ("default", "full"):
        raise _unsupported(f"unknown vision_feature_select_strategy {strategy!r}", expected="default or full")
    return feature_layer, strategy


def _tower_dims(vc, tc, tower: dict[str, Any]) -> tuple[TowerDims, TowerDims]:
    """(ViT, LLM) dimensions; the LLM's key/value heads default to its heads (no GQA)."""
    vheads = getattr(vc, tower["heads"])
    vit = TowerDims(
        layers=getattr(vc, tower["layers"]),
        hidden=vc.hidden_size,
        ffn=vc.intermediate_size,
        heads=vheads,
        kv_heads=vheads,
        head_dim=vc.hidden_size // vheads,
        mlp=tower["mlp"],
    )
    heads = tc.num_attention_heads
    llm = TowerDims(
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        ffn=tc.intermediate_size,
        heads=heads,
        kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        mlp=_TEXT_MODELS[tc.model_type]["mlp"],
    )
    return vit, llm


def _token_facts(config, tc) -> dict[str, Any]:
    """The image placeholder id and whether the LM head shares the input embeddings (the
    text config's word first, then the top-level config's)."""
    tie = getattr(tc, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(config, "tie_word_embeddings", False)
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    return {"image_token_id": image_token_id, "tie_word_embeddings": bool(tie)}


@functools.lru_cache(maxsize=None)
def _builtin_spec(name: str) -> ModelSpec:
    # spec_from_config's result, shipped as data (builtins.SHIPPED_SPECS; a test
    # regenerates it) so naming a built-in model does not import transformers
    return shipped_spec(name, _config_from_dict)


@functools.lru_cache(maxsize=64)
def _dir_spec(path: str, mtime: float) -> ModelSpec:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise _unsupported(f"{config_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise _unsupported(f"{config_path}: expected a JSON object")
    name = os.path.basename(os.path.normpath(path)) or path
    return spec_from_config(data, name=name, description=f"local model directory {path}", source=path)


# Models registered at run time (e.g. a trained test model shipped as package data):
# name -> factory returning its spec. Built-in names cannot be replaced.
_REGISTERED: dict[str, Callable[[], ModelSpec]] = {}
_REGISTERED_SPECS: dict[str, ModelSpec] = {}


def register_spec(name: str, factory: Callable[[], ModelSpec]) -> None:
    """Make `get_spec(name)` return `factory()` (called once, on first use)."""
    key = name.lower()
    if key in BUILTINS or key in ALIASES:
        raise ValueError(f"'{name}' is a built-in model name")
    _REGISTERED[key] = factory
    _REGISTERED_SPECS.pop(key, None)


def _registered_spec(key: str) -> ModelSpec:
    spec = _REGISTERED_SPECS.get(key)
    if spec is None:
        spec = _REGISTERED_SPECS[key] = _REGISTERED[key]()
    return spec


def list_specs() -> list[ModelSpec]:
    """The built-in models, in registry order, then registered ones."""
    return [_builtin_spec(name) for name in BUILTINS] + [_registered_spec(k) for k in _REGISTERED]


def builtin_names() -> list[str]:
    return list(BUILTINS)


def get_spec(name_or_path: "str | os.PathLike | ModelSpec") -> ModelSpec:
    """A built-in model by name (or hub-style alias), or a local directory's `config.json`.

    Unknown names raise `PolicyError` with a did-you-mean hint.
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    text = os.fspath(name_or_path).strip()
    key = text.lower()
    if key in BUILTINS:
        return _builtin_spec(key)
    if key in ALIASES:
        return _builtin_spec(ALIASES[key])
    if key in _REGISTERED:
        return _registered_spec(key)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise _unsupported(
                f"model directory {text!r} has no config.json",
                expected="a transformers model directory (config.json, *.safetensors)",
            )
        return _dir_spec(os.path.abspath(path), os.path.getmtime(config_path))
    if text.startswith((".", "~", os.sep)) or text.count("/") > 1:
        raise _unsupported(
            f"no such model directory {text!r}",
            expected="a built-in model (" + ", ".join(BUILTINS) + ") or a local model directory",
        )
    known = list(BUILTINS) + list(ALIASES) + list(_REGISTERED)
    raise PolicyError(
        Diagnostic(
            f"unknown model {text!r}",
            expected="a built-in model (" + ", ".join(list(BUILTINS) + list(_REGISTERED)) + ") or a local model directory",
            hint=did_you_mean(key, known),
            code="model",
        )
    )
