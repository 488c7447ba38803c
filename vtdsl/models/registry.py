"""Model registry: names and local directories -> `ModelSpec`, through one code path.

Every spec, built-in or not, is made by `spec_from_config` from a transformers config, so
the figures the cost model and the compiler use are the ones transformers builds. What a
config's `model_type` means (classes, paths, layout, towers) is its family's module in
`vtdsl.models.families`; this module is the generic reader and names no family.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import replace
from typing import Any, Callable

from ..lang.errors import Diagnostic, PolicyError, did_you_mean
from .builtins import ALIASES, BUILTINS, shipped_spec
from .families import FAMILIES as _FAMILIES
from .families import TEXT_MODELS as _TEXT_MODELS
from .families import VISION_TOWERS as _VISION_TOWERS
from .families import unsupported
from .shipped import trained_dir
from .spec import DTYPE_BYTES, ModelSpec, TowerDims
from .validate import check_preprocessor, checked_dims, located, read_config, read_json_object


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text[len("torch.") :] if text.startswith("torch.") else text


def _config_from_dict(data: dict):
    model_type = data.get("model_type")
    if model_type not in _FAMILIES:
        raise unsupported(
            f"unsupported model type {model_type!r}",
            expected="a model type vtdsl knows: " + ", ".join(sorted(_FAMILIES)),
            hint=did_you_mean(str(model_type), _FAMILIES),
        )
    import transformers

    cls = getattr(transformers, _FAMILIES[model_type].config_class)
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
    layout = fam.layout(config, vc) if fam.layout else {}
    feature_layer, strategy = _feature_selection(config, layout)
    vit, llm = _tower_dims(vc, tc, tower)
    if not -vit.layers - 1 <= feature_layer <= vit.layers:
        raise unsupported(f"vision_feature_layer {feature_layer} is outside a {vit.layers}-layer vision tower")
    dtype = _dtype_name(getattr(config, "dtype", None)) or _dtype_name(getattr(tc, "dtype", None)) or "float32"
    if dtype not in DTYPE_BYTES:
        raise unsupported(f"unsupported dtype {dtype!r}", expected=", ".join(DTYPE_BYTES))

    if name is None:
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or "custom"
    if description is None:
        description = (
            f"{fam.family}: {vc.model_type} {vit.layers}L/{vit.hidden} + "
            f"{tc.model_type} {llm.layers}L/{llm.hidden}"
        )
    fields: dict[str, Any] = dict(
        image_size=getattr(vc, "image_size", None),
        patch_size=vc.patch_size,
        channels=getattr(vc, "num_channels", 3),
        projector=(vit.hidden, llm.hidden, llm.hidden),
    )
    fields.update(layout)
    fields.update(vision_feature_layer=feature_layer, select_strategy=strategy)
    return ModelSpec(
        name=name,
        family=fam.family,
        description=description,
        vit=vit,
        llm=llm,
        vocab_size=tc.vocab_size,
        has_cls=tower["has_cls"],
        dtype=dtype,
        vit_layer_path=fam.vit_layer_path,
        projector_path=fam.projector_path,
        llm_layer_path=fam.llm_layer_path,
        make_config=make_config,
        model_class=fam.model_class,
        attn_implementation="sdpa",
        checkpoint_renames=fam.checkpoint_renames,
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
        raise unsupported(
            f"unsupported model type {model_type!r}",
            expected="a model type vtdsl knows: " + ", ".join(sorted(_FAMILIES)),
        )
    frozen = copy.deepcopy(config)

    def make_config(frozen=frozen):
        return copy.deepcopy(frozen)

    return config, make_config


def _supported_parts(vc, tc) -> dict[str, Any]:
    """The vision tower's row (`ModelFamily.vision_towers`), once both towers are known ones."""
    if vc.model_type not in _VISION_TOWERS:
        raise unsupported(
            f"unsupported vision tower {vc.model_type!r}",
            expected="one of: " + ", ".join(sorted(_VISION_TOWERS)),
        )
    if tc.model_type not in _TEXT_MODELS:
        raise unsupported(
            f"unsupported language model {tc.model_type!r}",
            expected="one of: " + ", ".join(sorted(_TEXT_MODELS)),
        )
    return _VISION_TOWERS[vc.model_type]


def _feature_selection(config, layout: dict[str, Any]) -> tuple[int, str]:
    """The ViT layer whose output feeds the projector, and which of its tokens do (the
    family layout's values first, then the config's)."""
    feature_layer = layout.get("vision_feature_layer", getattr(config, "vision_feature_layer", None))
    if not isinstance(feature_layer, int):
        raise unsupported(
            f"vision_feature_layer {feature_layer!r}: multi-layer image features are not supported",
            expected="a single layer index such as -2",
        )
    strategy = layout.get("select_strategy", getattr(config, "vision_feature_select_strategy", None))
    if strategy not in ("default", "full"):
        raise unsupported(f"unknown vision_feature_select_strategy {strategy!r}", expected="default or full")
    return feature_layer, strategy


def _tower_dims(vc, tc, tower: dict[str, Any]) -> tuple[TowerDims, TowerDims]:
    """(ViT, LLM) dimensions; the LLM's key/value heads default to its heads (no GQA).
    The tower row names the vision config's fields (or computes them from it)."""

    def read(key: str, default: str) -> int:
        how = tower.get(key, default)
        return how(vc) if callable(how) else getattr(vc, how)

    vheads, width = read("heads", "num_attention_heads"), read("hidden", "hidden_size")
    vit = TowerDims(
        layers=read("layers", "num_hidden_layers"),
        hidden=width,
        ffn=read("ffn", "intermediate_size"),
        heads=vheads,
        kv_heads=vheads,
        head_dim=width // vheads,
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
    spec = shipped_spec(name, _config_from_dict)
    trained = trained_dir(name)  # a built-in whose trained weights ship (tiny-llava-vtbench2)
    return spec if trained is None else replace(spec, source=str(trained), pretrained=True)


@functools.lru_cache(maxsize=64)
def _dir_spec(path: str, mtime: float) -> ModelSpec:
    config_path = os.path.join(path, "config.json")
    data = read_config(config_path)
    # the image processor's settings decide some counts (Qwen2-VL's pixel range); the
    # family's layout reads them from this key (a vtdsl key, ignored by transformers)
    processor_path = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(processor_path):
        data["vtdsl_preprocessor"] = check_preprocessor(read_json_object(processor_path), processor_path)
    name = os.path.basename(os.path.normpath(path)) or path
    with located(config_path, data):
        spec = spec_from_config(data, name=name, description=f"local model directory {path}", source=path)
    return checked_dims(spec, config_path)


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
            raise unsupported(
                f"model directory {text!r} has no config.json",
                expected="a transformers model directory (config.json, *.safetensors)",
            )
        stamps = [os.path.getmtime(p) for p in (config_path, os.path.join(path, "preprocessor_config.json"))
                  if os.path.isfile(p)]
        return _dir_spec(os.path.abspath(path), max(stamps))
    if text.startswith((".", "~", os.sep)) or text.count("/") > 1:
        raise unsupported(
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
