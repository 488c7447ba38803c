"""`vtdsl check` on a built-in model reads shipped spec data, never torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtdsl.models import builtin_names, spec_from_config
from vtdsl.models.builtins import BUILTINS, SHIPPED_SPECS, builtin_config_dict, spec_to_json, specs_text
from vtdsl.models.registry import _builtin_spec as shipped_spec  # noqa: PLC2701 - the shipped data as the registry reads it

ROOT = Path(__file__).resolve().parent.parent


def test_regenerating_the_shipped_specs_gives_the_shipped_file():
    # the file must be what spec_from_config makes from the transformers configs today
    made = {name: spec_to_json(spec_from_config(builtin_config_dict(name), name=name, description=desc))
            for name, (_, desc) in BUILTINS.items()}
    assert SHIPPED_SPECS.read_text(encoding="utf-8") == specs_text(made)


@pytest.mark.parametrize("name", builtin_names())
def test_shipped_spec_equals_the_config_built_one(name):
    _, description = BUILTINS[name]
    built = spec_from_config(builtin_config_dict(name), name=name, description=description)
    shipped = shipped_spec(name)
    assert shipped == built
    # derived counts too (they read tuple fields, which must come back as tuples)
    assert (shipped.image_tokens, shipped.unused_vit_layers, shipped.crop_map if shipped.packs_crops else None) == (
        built.image_tokens, built.unused_vit_layers, built.crop_map if built.packs_crops else None)
    if built.vit_window:
        assert shipped.vit_window_pairs == built.vit_window_pairs


def test_shipped_spec_still_builds_its_transformers_config():
    config = shipped_spec("tiny-llava").config()
    assert type(config).__name__ == "LlavaConfig"
    assert config.text_config.hidden_size == 32


def test_check_on_a_registered_model_imports_no_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from vtdsl.cli import main\n"
        "r = CliRunner().invoke(main, ['check', 'policies/fastv.vt', '--model', 'llava-1.5-7b', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "print(bad, r.output.count('\"conventions\"'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[] 1"


def test_check_json_is_the_same_whatever_the_spec_source():
    # the payload from shipped data equals the one from a spec built through transformers
    from vtdsl.cost import estimate
    from vtdsl.ir import check
    from vtdsl.lang import parse_file

    for name, file in (("llava-1.5-7b", "visionzip.vt"), ("qwen2.5-vl-7b", "fastv.vt"), ("llava-next-7b", "visionzip.vt")):
        policy = parse_file(ROOT / "policies" / file)
        _, description = BUILTINS[name]
        built = spec_from_config(builtin_config_dict(name), name=name, description=description)
        a = estimate(check(policy, shipped_spec(name))).to_json()
        b = estimate(check(policy, built)).to_json()
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
