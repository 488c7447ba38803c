"""A model directory's config.json, checked where it is read.

A careless or hostile config.json must end in one located refusal (exit 2 in the CLI),
never in a traceback from deep inside transformers or the registry (issue 17, item 7).
Three layers: `read_config` checks what the registry and the layouts read (a JSON object,
known model types, sub-configs that are objects, sizes that are positive integers within
sane bounds, a language model's head arithmetic, dtypes, pinpoints); `located` turns
whatever transformers' own validation still refuses into a `PolicyError` that names the
file and the key path, e.g. `config.json: error: vision_config.hidden_act: Field
'hidden_act' expected str, got int (value: 5)`; `checked_dims` checks the spec's towers
once transformers has filled in its defaults.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from typing import Any, Iterator

from ..lang.errors import Diagnostic, PolicyError, did_you_mean
from .families import FAMILIES
from .spec import DTYPE_BYTES

# Upper bounds far above any released VLM, so a typo (or 1e12) is refused here instead of
# allocating a 1e12-entry layer list or overflowing a storage size on the meta device.
MAX_LAYERS = 1024
MAX_SIDE = 1 << 16  # pixels: image sides, patches, windows, pinpoints
MAX_WIDTH = 1 << 24  # hidden / FFN widths, heads, vocabulary, positions
LAYER_KEYS = ("num_hidden_layers", "depth")
SIDE_KEYS = ("image_size", "patch_size", "window_size", "spatial_merge_size", "temporal_patch_size")
WIDTH_KEYS = ("hidden_size", "embed_dim", "intermediate_size", "num_attention_heads", "num_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "num_channels", "in_channels",
              "out_hidden_size", "projection_dim")
# null means "derive it" to transformers (from the hidden size / the attention heads)
OPTIONAL_KEYS = ("head_dim", "num_key_value_heads")
PARTS = ("vision_config", "text_config")


def config_error(config_path: str, key: str | None, problem: str, expected: str | None = None,
                 hint: str | None = None) -> PolicyError:
    """The refusal of `config_path` at `key` (a dotted path such as `text_config.vocab_size`)."""
    message = f"{key}: {problem}" if key else problem
    return PolicyError(Diagnostic(message, expected=expected, hint=hint, code="model"), filename=config_path)


def read_json_object(path: str) -> dict:
    """A JSON file that must hold an object (config.json, preprocessor_config.json)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise config_error(path, None, f"not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise config_error(path, None, "not UTF-8 text") from None
    except RecursionError:
        raise config_error(path, None, "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise config_error(path, None, f"expected a JSON object, got {_kind(data)}")
    return data


def read_config(config_path: str) -> dict:
    """config.json as a dict, once `check_config` accepts it."""
    data = read_json_object(config_path)
    check_config(data, config_path)
    return data


def check_config(data: Any, config_path: str) -> None:
    """Refuse, naming the key, what the registry would otherwise trip over."""
    if not isinstance(data, dict):
        raise config_error(config_path, None, f"expected a JSON object, got {_kind(data)}")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise config_error(config_path, "model_type", f"unsupported model type {_short(model_type)}",
                           expected="a model type vtdsl knows: " + ", ".join(sorted(FAMILIES)),
                           hint=did_you_mean(str(model_type), FAMILIES))
    scopes = [("", data)]
    for part in PARTS:
        sub = data.get(part)
        if sub is not None and not isinstance(sub, dict):
            raise config_error(config_path, part, f"expected a JSON object, got {_kind(sub)}")
        if sub is not None:
            scopes.append((part + ".", sub))
    for prefix, scope in scopes:
        for keys, most in ((LAYER_KEYS, MAX_LAYERS), (SIDE_KEYS, MAX_SIDE), (WIDTH_KEYS, MAX_WIDTH)):
            for key in keys:
                if key in SIDE_KEYS and isinstance(scope.get(key), list):  # [height, width] (InternVL)
                    _pair(scope[key], config_path, prefix + key)
                elif key in scope and not (key in OPTIONAL_KEYS and scope[key] is None):
                    _whole(scope[key], 1, most, config_path, prefix + key)
        for key in ("torch_dtype", "dtype"):
            name = scope.get(key)
            if name is not None and (not isinstance(name, str) or name.removeprefix("torch.") not in DTYPE_BYTES):
                raise config_error(config_path, prefix + key, f"unsupported dtype {_short(name)}",
                                   expected=", ".join(DTYPE_BYTES))
        if prefix:
            _known_tower(scope, prefix, FAMILIES[model_type], config_path)
    if "text_config" in data and data["text_config"] is not None:
        _language_model(data["text_config"], "text_config.", config_path)
    _pairs(data, config_path)
    if data.get("vtdsl_preprocessor") is not None:
        check_preprocessor(data["vtdsl_preprocessor"], config_path, "vtdsl_preprocessor")


def check_preprocessor(pre: Any, path: str, key: str = "") -> dict:
    """An image processor's settings (preprocessor_config.json, or config.json's
    `vtdsl_preprocessor`) as far as the layouts read them: pixel bounds, plain or in `size`."""
    dot = key + "." if key else ""
    if not isinstance(pre, dict):
        raise config_error(path, key or None, f"expected a JSON object, got {_kind(pre)}")
    size = pre.get("size")
    if size is not None and not isinstance(size, dict):
        raise config_error(path, dot + "size", f"expected a JSON object, got {_kind(size)}")
    for scope, prefix in ((pre, dot), (size or {}, dot + "size.")):
        for name in ("min_pixels", "max_pixels", "shortest_edge", "longest_edge"):
            if scope.get(name) is not None:
                _whole(scope[name], 1, MAX_SIDE * MAX_SIDE, path, prefix + name)
    return pre


def _known_tower(scope: dict, prefix: str, family, config_path: str) -> None:
    """A sub-config's model_type, when given, is one the family pairs (transformers would
    otherwise refuse an unknown one with its whole registry listed)."""
    if "model_type" not in scope:
        return
    known = family.vision_towers if prefix == "vision_config." else family.text_models
    value = scope["model_type"]
    if not isinstance(value, str) or value not in known:
        what = "vision tower" if prefix == "vision_config." else "language model"
        raise config_error(config_path, prefix + "model_type", f"unsupported {what} {_short(value)}",
                           expected="one of: " + ", ".join(sorted(known)))


def _language_model(scope: dict, prefix: str, config_path: str) -> None:
    """Llama-style head arithmetic of a language model (vision towers name their widths
    differently per family; transformers' own validators locate those), and a padding id
    its embedding can hold."""
    hidden = scope.get("hidden_size")
    heads_key = "num_attention_heads"
    heads, kv_heads = scope.get(heads_key), scope.get("num_key_value_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and scope.get("head_dim") is None and hidden % heads:
        raise config_error(config_path, prefix + "hidden_size",
                           f"{hidden} is not divisible by {heads_key} ({heads})",
                           expected=f"a multiple of {heads_key}, or a head_dim")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise config_error(config_path, prefix + "num_key_value_heads",
                           f"{heads_key} ({heads}) is not a multiple of {kv_heads}")
    vocab, pad = scope.get("vocab_size"), scope.get("pad_token_id")
    if isinstance(vocab, int) and isinstance(pad, int) and not isinstance(pad, bool) and not -vocab <= pad < vocab:
        raise config_error(config_path, prefix + "pad_token_id", f"{pad} is not a token of a {vocab}-word vocabulary")


def _pairs(data: dict, config_path: str) -> None:
    """Lists of integers the layouts read (anyres pinpoints, Qwen's reference image and
    full-attention blocks, a feature layer list)."""
    pinpoints = data.get("image_grid_pinpoints")
    if pinpoints is not None:
        if not isinstance(pinpoints, list) or not pinpoints:
            raise config_error(config_path, "image_grid_pinpoints", f"expected a list of [height, width] pairs, "
                               f"got {_kind(pinpoints)}")
        for i, pair in enumerate(pinpoints):
            _pair(pair, config_path, f"image_grid_pinpoints[{i}]")
    if data.get("vtdsl_reference_image") is not None:
        _pair(data["vtdsl_reference_image"], config_path, "vtdsl_reference_image")
    vision = data.get("vision_config") or {}
    for key, values in (("vision_config.fullatt_block_indexes", vision.get("fullatt_block_indexes")),
                        ("vision_feature_layer", data.get("vision_feature_layer"))):
        if isinstance(values, list):
            for i, value in enumerate(values):
                _whole(value, -MAX_LAYERS, MAX_LAYERS, config_path, f"{key}[{i}]")


def _pair(pair: Any, config_path: str, key: str) -> None:
    if not isinstance(pair, list) or len(pair) != 2:
        raise config_error(config_path, key, f"expected [height, width], got {_kind(pair)}")
    for value in pair:
        _whole(value, 1, MAX_SIDE, config_path, key)


def _whole(value: Any, least: int, most: int, config_path: str, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise config_error(config_path, key, f"expected an integer, got {_kind(value)}")
    if not least <= value <= most:
        raise config_error(config_path, key, f"{value} is out of range", expected=f"{least}..{most}")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    """`string 'abc'`, `list`, `null`: what a user wrote, short."""
    if value is None:
        return "null"
    name = {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)
    if isinstance(value, (str, int, float)) and len(repr(value)) <= 40:
        return f"{name} {value!r}"
    return name


def checked_dims(spec, config_path: str):
    """`spec`, once its towers' head arithmetic holds with transformers' defaults filled in
    (a deleted `num_attention_heads` takes the class default, which may not divide the
    width the file still gives)."""
    for dims, part in ((spec.vit, "vision_config"), (spec.llm, "text_config")):
        if min(dims.heads, dims.kv_heads, dims.head_dim) < 1:
            raise config_error(config_path, part, f"{dims.heads} attention heads leave a {dims.hidden}-wide "
                               "tower no head dimension", expected="hidden_size a multiple of the heads")
        if dims.heads % dims.kv_heads:
            raise config_error(config_path, part + ".num_key_value_heads",
                               f"{dims.heads} attention heads are not a multiple of {dims.kv_heads}")
    return spec


@contextmanager
def located(config_path: str, data: dict) -> Iterator[None]:
    """Name `config_path` in any refusal raised while a spec is made from `data`: the
    registry's own (which know the value, not the file) and transformers' validation
    errors (which know the field, not the sub-config it sits in)."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except PolicyError as err:
        if err.filename == "<policy>":
            err.with_source(None, config_path)
        raise
    except (StrictDataclassError, ValueError, TypeError) as exc:
        raise _transformers_error(exc, data, config_path) from None


def _transformers_error(exc: Exception, data: dict, config_path: str) -> PolicyError:
    """transformers' refusal as `config.json: <key path>: <its reason>`."""
    cause = exc.__cause__ or exc
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if len(reason) > 160:
        reason = reason[:157] + "..."
    match = re.match(r"Validation error for field '([^']+)'", str(exc))
    field = match.group(1) if match else None
    part = _failing_part(data)
    if field is None:
        return config_error(config_path, part, reason)
    if part is None:
        holders = [p for p in PARTS if isinstance(data.get(p), dict) and field in data[p]]
        part = holders[0] if len(holders) == 1 and field not in data else None
    return config_error(config_path, f"{part}.{field}" if part else field, reason)


def _failing_part(data: dict) -> str | None:
    """The sub-config that transformers refuses on its own, if one does (None when both
    build, or when a sub-config's class cannot be told without its model_type)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = FAMILIES[data["model_type"]]
    sub_configs = getattr(getattr(transformers, family.config_class), "sub_configs", {})
    for part in PARTS:
        sub, cls = data.get(part), sub_configs.get(part)
        if cls is AutoConfig:
            cls = CONFIG_MAPPING.get(sub.get("model_type")) if isinstance(sub, dict) else None
        if not isinstance(sub, dict) or cls is None:
            continue
        try:
            cls(**{k: v for k, v in sub.items() if k != "model_type"})
        except Exception:  # noqa: BLE001 - any refusal of this part alone locates it
            return part
    return None
