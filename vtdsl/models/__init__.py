"""Model registry: which vision-language models vtdsl knows, and how to build them.

    from vtdsl.models import get_spec
    spec = get_spec("llava-1.5-7b")          # built-in (architecture only)
    spec = get_spec("./my-llava")             # a local directory with config.json
    spec = spec_from_config(my_llava_config)  # a user's own LlavaConfig / model
    model = spec.build(device="meta")         # LlavaForConditionalGeneration, no storage
    model = load_weights(spec, "./my-llava")  # real weights (safetensors only)
    get_spec("tiny-llava-vtbench").build("cpu")  # the model trained here (package data)
"""

from .loading import WeightsError, load_weights
from .registry import builtin_names, get_spec, list_specs, register_spec, spec_from_config
from .spec import ModelSpec, TowerDims
from .vtbench import register_shipped as _register_shipped

_register_shipped()  # tiny-llava-vtbench, when its trained weights are in the package

__all__ = [
    "ModelSpec",
    "TowerDims",
    "WeightsError",
    "builtin_names",
    "get_spec",
    "list_specs",
    "load_weights",
    "register_spec",
    "spec_from_config",
]
