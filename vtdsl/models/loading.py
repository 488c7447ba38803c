"""Instantiating models from specs, and loading local safetensors weights into them.

Only safetensors files are read (never pickles), and no code from a model directory is
ever run (no `trust_remote_code`): the architecture comes from the spec.
"""

from __future__ import annotations

import functools
import json
import os
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from .spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch


class WeightsError(ValueError):
    """A model directory's weights cannot be loaded into the spec's architecture."""


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _model_class(spec: ModelSpec):
    import transformers

    return getattr(transformers, spec.model_class)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def build_model(
    spec: ModelSpec,
    device="meta",
    dtype=None,
    seed: int = 0,
    attn_implementation: str | None = None,
    init_weights: bool = True,
):
    """See `ModelSpec.build`. `init_weights=False` leaves real-device weights uninitialised
    (used by `load_weights`, which overwrites every one of them)."""
    import torch

    dtype = _torch_dtype(dtype if dtype is not None else spec.dtype)
    device = torch.device(device)
    cls = _model_class(spec)
    config = spec.config()
    impl = attn_implementation or spec.attn_implementation
    with _quiet_transformers():
        if device.type == "meta":
            # No storage on meta: init functions are no-ops, so this is just module setup.
            with torch.device("meta"):
                model = cls._from_config(config, dtype=dtype, attn_implementation=impl)
        elif not init_weights:
            from transformers.initialization import no_init_weights

            with torch.device(device), no_init_weights():
                model = cls._from_config(config, dtype=dtype, attn_implementation=impl)
        else:
            # Seed without disturbing the caller's RNG streams (CPU, and CUDA when used).
            forked = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=forked):
                torch.manual_seed(seed)
                with torch.device(device):
                    model = cls._from_config(config, dtype=dtype, attn_implementation=impl)
    model.eval()
    return model


@functools.lru_cache(maxsize=None)
def _param_count(spec: ModelSpec) -> int:
    model = build_model(spec, device="meta")
    return sum(p.numel() for p in model.parameters())  # tied parameters are listed once


def param_count(spec: ModelSpec) -> int:
    return _param_count(spec)


# ---------------------------------------------------------------------- weights
def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a model directory (sharded via its index, or all)."""
    if not os.path.isdir(path):
        raise WeightsError(f"not a model directory: {path}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = _index_shards(index)
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise WeightsError(f"{index} names shard(s) that are not there: {', '.join(missing[:3])}")
        if not files:
            raise WeightsError(f"{index} has an empty weight_map")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(path, f) for f in files]
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise WeightsError(
            f"{path} has only pickle weights ({', '.join(pickles[:3])}); vtdsl loads safetensors only. "
            "Convert them once with a trusted tool (e.g. save_pretrained(..., safe_serialization=True))."
        )
    raise WeightsError(f"{path} has no *.safetensors weights")


def _index_shards(index: str) -> list[str]:
    """The shard file names an index maps tensors to: plain names of files beside it."""
    try:
        with open(index, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{index}: not valid JSON ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightsError(f"{index}: weight_map: expected an object mapping tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    # a name with a directory part would read a file outside the model directory
    outside = [f for f in files if not f or os.path.basename(f) != f or f in (".", "..")]
    if outside:
        raise WeightsError(f"{index}: weight_map: {outside[0]!r} is not a file name in the model directory")
    return files


def rename_key(spec: ModelSpec, key: str) -> str:
    """Map a checkpoint key onto this transformers version's parameter name."""
    for pattern, replacement in _compiled_renames(spec.checkpoint_renames):
        new, n = pattern.subn(replacement, key, count=1)
        if n:
            return new
    return key


@functools.lru_cache(maxsize=None)
def _compiled_renames(rules: tuple[tuple[str, str], ...]):
    return tuple((re.compile(p), r) for p, r in rules)


def _check_architecture(spec: ModelSpec, path: str) -> None:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return
    from .registry import get_spec

    theirs = get_spec(os.path.abspath(path))  # read and checked as `--model DIR` reads it
    fields = ("family", "vit", "llm", "vocab_size", "image_size", "patch_size", "channels", "projector")
    diffs = [f for f in fields if getattr(theirs, f) != getattr(spec, f)]
    if diffs:
        f = diffs[0]
        raise WeightsError(
            f"{config_path} describes a different architecture than '{spec.name}': "
            f"{f} is {getattr(theirs, f)!r} there, {getattr(spec, f)!r} in the spec"
        )


def load_weights(spec: ModelSpec, path: str | None = None, device="cpu", dtype=None, attn_implementation=None):
    """Build `spec`'s model on `device` and load the safetensors weights of a local
    directory into it. Every parameter must be present in the files with its exact shape
    (a tied lm_head may be absent); extra tensors are an error too, so a wrong
    checkpoint never loads half-way. The files' headers are checked against the
    architecture on the meta device first, so a checkpoint that does not fit is refused
    before any memory is allocated for it. Returns the model in eval mode.
    """
    import torch

    path = os.path.expanduser(os.fspath(path if path is not None else (spec.source or "")))
    if not path:
        raise WeightsError(f"model '{spec.name}' has no weights directory; pass one")
    files = safetensors_files(path)
    _check_architecture(spec, path)
    sources, tied = _tensor_sources(spec, files, path)

    model = build_model(
        spec, device=device, dtype=dtype, attn_implementation=attn_implementation, init_weights=False
    )
    loaded: dict[str, "torch.Tensor"] = {}
    for file in files:
        with _opened(file) as fh:
            loaded.update((name, fh.get_tensor(key)) for name, (f, key) in sources.items() if f == file)
    with torch.no_grad():
        result = model.load_state_dict(loaded, strict=False)
    leftover = set(result.missing_keys) - tied
    if leftover:  # pragma: no cover - guarded by _tensor_sources
        raise WeightsError(f"weights not loaded: {sorted(leftover)[:3]}")
    if tied and spec.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model


def _tensor_sources(spec: ModelSpec, files: list[str], path: str) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """(parameter name -> (file, key in it), tied parameter names), from the files'
    headers only, once every parameter has exactly one tensor of its meta-device shape."""
    meta = build_model(spec, device="meta")
    expected = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    tied = set(getattr(meta, "all_tied_weights_keys", {}) or {})
    sources: dict[str, tuple[str, str]] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for file in files:
        with _opened(file) as fh:
            for key in fh.keys():
                name = rename_key(spec, key)
                if name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(fh.get_slice(key).get_shape())
                if shape != expected[name]:
                    mismatched.append(f"{key}: {shape} vs {expected[name]}")
                    continue
                if name in sources:
                    raise WeightsError(f"{path}: two tensors load into {name}")
                sources[name] = (file, key)
    missing = sorted(set(expected) - set(sources) - tied)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(sorted(unexpected)[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} with the wrong shape (e.g. {'; '.join(mismatched[:2])})")
    if problems:
        raise WeightsError(f"weights in {path} do not fit '{spec.name}': " + "; ".join(problems))
    return sources, tied


@contextmanager
def _opened(file: str):
    """`safe_open` on the CPU; garbage, an empty file or a pickle under a safetensors
    name is refused unread (safetensors parses a JSON header and never unpickles)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as fh:
            yield fh
    except SafetensorError as err:
        raise WeightsError(f"{file}: not a readable safetensors file ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


# ---------------------------------------------------------------------- ready to run
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(name: str = "auto") -> str:
    """`auto`: CUDA when torch sees a GPU, else Apple's MPS, else the CPU. A named device
    that this torch cannot use is refused here, not half-way through loading."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name not in DEVICES:
        raise WeightsError(f"unknown device {name!r} (expected one of {', '.join(DEVICES)})")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not has_mps):
        raise WeightsError(f"device {name!r} is not available to this torch ({torch.__version__})")
    return name


def resolve_dtype(name: str | None, spec: ModelSpec) -> str:
    """`auto` (or None): the checkpoint's own `torch_dtype`, the spec's dtype."""
    if name in (None, "auto"):
        return spec.dtype
    if name not in DTYPES:
        raise WeightsError(f"unknown dtype {name!r} (expected one of {', '.join(DTYPES)})")
    return name


class Loaded:
    """A model with real weights and what turns an image and a question into its inputs.

    `processor` is the directory's own (AutoProcessor, local files only); `path` the
    directory the weights came from; `device` and `dtype` what was resolved."""

    def __init__(self, model, processor, spec: ModelSpec, path: str, device: str, dtype: str):
        self.model, self.processor, self.spec = model, processor, spec
        self.path, self.device, self.dtype = path, device, dtype

    @property
    def one_word(self) -> bool:
        """Whether the model answers in one token (a model exported by the vtbench
        training script, which only ever learnt the first answer token)."""
        return os.path.isfile(os.path.join(self.path, "training.json"))


def weights_dir(name_or_dir: str) -> tuple[ModelSpec, str]:
    """(spec, directory) of a registered model with shipped weights (`tiny-llava-vtbench`)
    or of a local HF model directory of a registered family."""
    from .registry import get_spec

    spec = get_spec(name_or_dir)
    path = spec.source if spec.pretrained else os.path.expanduser(os.fspath(name_or_dir))
    if not path or not os.path.isdir(path):
        raise WeightsError(f"'{name_or_dir}' has no weights here: pass a local HF model directory "
                           "(config.json, *.safetensors, processor files)")
    return spec, os.path.abspath(path)


def load_processor(path: str):
    """The directory's own processor, offline; never runs code from the directory."""
    from transformers import AutoProcessor

    try:
        with _quiet_transformers():
            return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: no usable processor (processor_config.json / preprocessor_config.json "
                           f"and tokenizer files expected): {first}") from None


def load_pretrained(name_or_dir: str, device: str = "auto", dtype: str | None = "auto",
                    attn_implementation: str | None = None) -> Loaded:
    """Load a local checkpoint (sharded safetensors with an index, any `torch_dtype`) and
    its processor, ready for `generate`: `device` in `DEVICES`, `dtype` in `DTYPES`."""
    spec, path = weights_dir(name_or_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, spec)
    processor = load_processor(path)
    model = load_weights(spec, path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    return Loaded(model, processor, spec, path, device, dtype)
