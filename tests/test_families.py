"""Model families (vtdsl/compiler/families): one object per family, chosen by the spec;
the compiler core asks it instead of testing spec fields; the installer's undo restores a
model whatever step fails. Expected layouts are written out here from the models' rules."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.compiler.families import FAMILIES, SIZE_ARGUMENTS, family_of
from vtdsl.compiler.families.llava_next import anyres_tokens
from vtdsl.compiler.inputs import count_images
from vtdsl.compiler.installer import Installer
from vtdsl.ir import check
from vtdsl.lang import parse
from vtdsl.models import get_spec, list_specs

ROOT = Path(__file__).resolve().parents[1]
CORE = ("api.py", "installer.py", "runtime.py", "llm.py", "vit.py", "layouts.py", "inputs.py", "listing.py")
# spec fields that stand for one family: the core must ask the family object instead
FAMILY_FIELDS = ("anyres_grid", "anyres_map", "anyres_pinpoints", "image_newline", "dynamic_resolution",
                 "position_encoding", "image_grid")


def test_every_registered_model_has_its_family():
    expected = {"llava-1.5-7b": "llava", "llava-1.5-13b": "llava", "tiny-llava": "llava",
                "llava-next-7b": "llava-next", "tiny-llava-next": "llava-next",
                "llava-next-video-7b": "llava-next-video", "tiny-llava-next-video": "llava-next-video",
                "qwen2.5-vl-7b": "qwen2.5-vl", "tiny-qwen2.5-vl": "qwen2.5-vl",
                "qwen2-vl-7b": "qwen2-vl", "tiny-qwen2-vl": "qwen2-vl",
                "llava-onevision-qwen2-7b": "llava-onevision", "tiny-llava-onevision": "llava-onevision",
                "smolvlm-2.2b": "idefics3", "tiny-smolvlm": "smolvlm",
                "internvl3-8b": "internvl", "tiny-internvl3": "internvl",
                "qwen3-vl-8b": "qwen3-vl", "tiny-qwen3-vl": "qwen3-vl",
                "gemma-3-4b": "gemma3", "tiny-gemma3": "gemma3"}
    for name, family in expected.items():
        assert family_of(get_spec(name)) is FAMILIES[family]
    for spec in list_specs():  # the vtbench model too, when shipped
        assert family_of(spec).name == spec.family


def test_an_unknown_family_is_refused_with_the_known_ones():
    spec = replace(get_spec("tiny-llava"), family="paligemma")
    with pytest.raises(vc.CompileError, match="'paligemma' model, which vtdsl cannot compile; known families: "
                                              "gemma3, idefics3, internvl, llava, llava-next, llava-next-video, "
                                              "llava-onevision, qwen2.5-vl, qwen2-vl, qwen3-vl, smolvlm"):
        family_of(spec)


def test_the_core_never_reads_a_field_that_stands_for_a_family():
    hits = []
    for name in CORE:
        tree = ast.parse((ROOT / "vtdsl" / "compiler" / name).read_text(encoding="utf-8"))
        hits += [f"{name}:{node.lineno} .{node.attr}" for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr in FAMILY_FIELDS]
    assert not hits, hits


def test_size_arguments_and_image_counts():
    assert SIZE_ARGUMENTS == ("image_sizes", "image_grid_thw")
    # one row per image, however many crops (anyres) or patches (Qwen) each image has
    assert count_images({"pixel_values": torch.zeros(2, 5, 3, 8, 8), "image_sizes": torch.zeros(2, 2)}) == 2
    assert count_images({"pixel_values": torch.zeros(600, 12), "image_grid_thw": torch.ones(3, 3)}) == 3
    assert count_images({"pixel_values": torch.zeros(4, 3, 8, 8)}) == 4


def test_image_sizes_per_family():
    next_spec, qwen_spec, llava_spec = get_spec("tiny-llava-next"), get_spec("tiny-qwen2.5-vl"), get_spec("tiny-llava")
    assert family_of(next_spec).image_sizes(next_spec, {"image_sizes": [[57, 70], [112, 56]]}) == [(57, 70), (112, 56)]
    # Qwen's grid is in 14-pixel patches
    qwen = family_of(qwen_spec)
    assert qwen.image_sizes(qwen_spec, {"image_grid_thw": torch.tensor([[1, 16, 12]])}) == [(224, 168)]
    with pytest.raises(vc.CompileError, match="image inputs only"):
        qwen.image_sizes(qwen_spec, {"image_grid_thw": torch.tensor([[2, 16, 16]])})
    assert family_of(llava_spec).image_sizes(llava_spec, {"image_sizes": [[336, 336]]}) is None
    assert not family_of(llava_spec).sized_per_image and qwen.sized_per_image


def test_module_paths():
    cases = {"tiny-llava": ("model", "model.language_model", "model.vision_tower.encoder"),
             "tiny-qwen2.5-vl": ("model", "model.language_model", "model.visual")}
    for name, paths in cases.items():
        spec = get_spec(name)
        family = family_of(spec)
        assert (family.multimodal_path(spec), family.language_model_path(spec), family.encoder_path(spec)) == paths
        model = spec.build()  # meta: the paths name real modules
        for path in paths:
            model.get_submodule(path)


def test_anyres_tokens_follow_the_packed_layout():
    """tiny-llava-next at 112x112: a 4x4 base view, then the 2x2 crops' 8x8 map, each row
    ending in a newline token that counts with the row's last crop."""
    spec = get_spec("tiny-llava-next")
    tokens = anyres_tokens(2, 88, spec, "cpu")
    expected = [0] * 16
    for row in range(8):
        expected += [1 + (row // 4) * 2 + col // 4 for col in range(8)] + [1 + (row // 4) * 2 + 1]
    assert tokens.crop.tolist() == [expected, expected]
    assert tokens.vid[0].tolist() == list(range(1, 89)) and bool((tokens.gpos == -1).all())
    # pruned crops are concatenated: 5 crops of 4
    assert anyres_tokens(1, 20, spec, "cpu", intact=False).crop.tolist() == [sorted(list(range(5)) * 4)]
    with pytest.raises(vc.CompileError, match="21 visual tokens per image cannot be split into tiny-llava-next's 5"):
        anyres_tokens(1, 21, spec, "cpu")


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_installer_undoes_everything_when_a_step_fails(monkeypatch):
    spec = get_spec("tiny-llava-next")
    model = spec.build()
    tree = [(n, type(m)) for n, m in model.named_modules()]
    plan = check(parse("at vit.layer2 keep cls top 8; at llm.layer1 keep text top 20"), spec)
    family = family_of(spec)

    def failing_layout(installer, plan):
        type(family).install(family, installer, plan)  # the packing override is in place ...
        assert "pack_image_features" in model.model.__dict__
        raise RuntimeError("layout step failed")  # ... when a later step fails

    monkeypatch.setattr(family, "install", failing_layout)
    with pytest.raises(RuntimeError, match="layout step failed"):
        Installer(plan, model).install()
    assert [(n, type(m)) for n, m in model.named_modules()] == tree
    assert _hooks(model) == 0 and "pack_image_features" not in model.model.__dict__
    assert vc.compiled(model) is None


def test_the_installer_as_a_context_manager():
    spec = get_spec("tiny-llava")
    model = spec.build()
    plan = check(parse("at vit.layer3 keep cls top 300; at llm.layer2 keep text top 50%"), spec)
    with Installer(plan, model) as handle:
        assert vc.compiled(model) is handle
        assert model.__dict__.get("generate") is not None  # placeholders shrink before generation
        assert _hooks(model) == len([r for r in handle.listing.rewrites if r.mechanism.startswith("forward")])
    assert vc.compiled(model) is None and _hooks(model) == 0 and "generate" not in model.__dict__


def test_a_plan_fits_only_its_familys_layout():
    """Beyond the towers' shapes, a plan must share its family's layout fields and the
    family itself with the model it is installed on."""
    spec = get_spec("tiny-llava-next")
    model = spec.build()
    plan = check(parse("at llm.layer2 keep text top 50%"), spec)
    with pytest.raises(vc.CompileError, match=r"whose anyres_grid \(\(2, 2\)\) differs from the model's \(\(1, 4\)\)"):
        vc.compile(plan, model, spec=replace(spec, anyres_grid=(1, 4)))
    llava = get_spec("tiny-llava")
    plan = check(parse("at llm.layer2 keep text top 50%"), llava)
    with pytest.raises(vc.CompileError, match=r"whose family \(llava\) differs from the model's \(qwen2.5-vl\)"):
        vc.compile(plan, llava.build(), spec=replace(llava, family="qwen2.5-vl"))
    assert vc.compiled(model) is None


def test_families_are_discovered_modules_in_both_stages():
    """One module per family in each stage, found by `pkgutil` (no list to edit), and the
    two halves pair up: every spec family the registry can make has its compiler family."""
    from vtdsl.models import families as model_families

    def stems(folder):
        return {p.stem for p in (ROOT / "vtdsl" / folder / "families").glob("*.py")} - {"__init__", "base"}

    assert stems("models") == set(model_families.FAMILIES) == stems("compiler")
    assert {f.family for f in model_families.FAMILIES.values()} == set(FAMILIES)
    for stem, family in model_families.FAMILIES.items():
        assert family.model_type == stem
    assert set(model_families.VISION_TOWERS) >= {"clip_vision_model", "qwen2_5_vl_vision"}


def test_a_new_family_module_is_picked_up_and_a_duplicate_refused(tmp_path, monkeypatch):
    """A module dropped into a family package is found with no table edited; two modules
    claiming one model_type are refused, naming it."""
    from vtdsl.models.families import discover

    package = tmp_path / "probe_families"
    package.mkdir()
    (package / "__init__.py").write_text("")
    row = ("from vtdsl.models.families.base import ModelFamily\n"
           "FAMILY = ModelFamily(model_type={t!r}, family='probe', config_class='C', model_class='M',"
           " vit_layer_path='v.{{i}}', projector_path='p', llm_layer_path='l.{{i}}')\n")
    (package / "probe.py").write_text(row.format(t="probe_vl"))
    (package / "base.py").write_text("FAMILY = None  # never read: base holds the shared types\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover([str(package)], "probe_families")
    assert list(found) == ["probe_vl"] and found["probe_vl"].family == "probe"
    (package / "twin.py").write_text(row.format(t="probe_vl"))
    with pytest.raises(ValueError, match="model_type 'probe_vl' is claimed by two modules of probe_families"):
        discover([str(package)], "probe_families")
