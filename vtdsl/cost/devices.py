"""Device profiles for the latency model: common GPUs from their data sheets, and this
machine's CPU from `vtdsl calibrate` (a JSON file under the cache directory).

Data-sheet peaks are dense tensor-core FLOP/s (no sparsity) for float16 / bfloat16 and
plain (non-TF32) FP32, as PyTorch runs float32 matmuls by default; bandwidths are the
HBM/GDDR figures. `layer_overhead` for GPUs is an estimate, not a data-sheet figure:
eager PyTorch dispatches about 40 operations per decoder layer at about 8 us each;
`vtdsl calibrate --target cuda` measures it (and the peaks) on the GPU at hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .latency import DeviceProfile

_GPU_LAYER_OVERHEAD = 40 * 8e-6


def _gpu(name: str, half: float, fp32: float, bandwidth: float, source: str) -> DeviceProfile:
    return DeviceProfile(name, {"float16": half, "bfloat16": half, "float32": fp32}, bandwidth,
                         fused_attention=True, layer_overhead=_GPU_LAYER_OVERHEAD, source=source)


BUILTIN: dict[str, DeviceProfile] = {p.name: p for p in (
    _gpu("a100", 312e12, 19.5e12, 2.039e12,
         "NVIDIA A100 80GB SXM data sheet: 312 TFLOPS BF16/FP16, 19.5 FP32, 2,039 GB/s"),
    _gpu("h100", 989.4e12, 66.9e12, 3.35e12,
         "NVIDIA H100 SXM data sheet: 989 TFLOPS BF16/FP16 dense, 67 FP32, 3.35 TB/s"),
    _gpu("h200", 989.4e12, 66.9e12, 4.8e12,
         "NVIDIA H200 SXM data sheet: 989 TFLOPS BF16/FP16 dense, 67 FP32, 4.8 TB/s"),
    _gpu("l40s", 362.05e12, 91.6e12, 0.864e12,
         "NVIDIA L40S data sheet: 362 TFLOPS BF16/FP16 dense, 91.6 FP32, 864 GB/s"),
    _gpu("rtx4090", 165.2e12, 82.6e12, 1.008e12,
         "NVIDIA Ada whitepaper, RTX 4090: 165 TFLOPS FP16/BF16 (FP32 accumulate) dense, 82.6 FP32, 1,008 GB/s"),
)}


def profile_dir() -> Path:
    """Where `vtdsl calibrate` writes profiles ($VTDSL_DEVICE_DIR, else ~/.cache/vtdsl/devices)."""
    env = os.environ.get("VTDSL_DEVICE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vtdsl" / "devices"


def known_devices() -> list[str]:
    calibrated = sorted(p.stem for p in profile_dir().glob("*.json")) if profile_dir().is_dir() else []
    return sorted(set(BUILTIN) | set(calibrated))


def get_device(name: str) -> DeviceProfile:
    """A calibrated profile `name` (preferred: measured here), else a data-sheet one, else
    a path to a profile JSON. ValueError names what exists."""
    path = profile_dir() / f"{name.lower()}.json"
    if not path.is_file() and name.endswith(".json"):
        path = Path(name)
    if path.is_file():
        try:
            return DeviceProfile.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a device profile ({exc})") from None
    if name.lower() in BUILTIN:
        return BUILTIN[name.lower()]
    hint = " (run `vtdsl calibrate` to measure this machine's CPU)" if name.lower() == "cpu" else ""
    raise ValueError(f"unknown device '{name}'{hint}; known: {', '.join(known_devices())}")


def save_profile(profile: DeviceProfile, path: Path | None = None) -> Path:
    path = path or profile_dir() / f"{profile.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
