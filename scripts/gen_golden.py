"""Golden outputs of vtdsl for issue 18's "behaviour unchanged" check.

For every policy (policies/*.vt, examples/*.vt) on every registered model, one process
records what a user sees:

- `check`: the exit code and the dict `vtdsl check POLICY --model M --json` prints
  (refusals included: their diagnostics), run in-process through the CLI itself;
- `compile` (when the check did not refuse): the compile listing, its JSON form and the
  per-stage rows, on a model built on the meta device (full-size) or with random weights
  (tiny models), or the refusal's type and message;
- `forward` (tiny-llava, tiny-llava-next, tiny-qwen2.5-vl only): one compiled forward of a
  fixed batch (fixed seeds): the kept token indices per stage, the kept counts and a
  logits checksum.

Run it against the code under test (PYTHONPATH decides which `vtdsl` is imported; the
policies are read from the same tree as that package unless `--policies-from` names
another, e.g. the current checkout after a policy file's comments changed its line numbers):

    git worktree add /tmp/golden-base 324a26a
    PYTHONPATH=/tmp/golden-base .venv/bin/python scripts/gen_golden.py -o tests/fixtures/golden

tests/test_golden.py recomputes the same records with the current code and compares.
Timings and absolute paths vary per run and are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

TEXT_TOKENS = 64  # the CLI's default for check and compile
WEIGHT_SEED = 0
PIXEL_SEED = 7
RUN_SEED = 11  # global RNG before each forward (`random N` without a seed draws from it)


def package_root() -> Path:
    """The repository holding the imported `vtdsl` (its policies go with its code)."""
    import vtdsl

    return Path(vtdsl.__file__).resolve().parents[1]


def policy_files(root: Path) -> list[str]:
    """Zoo and example policies, as paths relative to `root`."""
    found = sorted((root / "policies").glob("*.vt")) + sorted((root / "examples").glob("*.vt"))
    return [str(p.relative_to(root)) for p in found]


@contextmanager
def working_directory(path: Path):
    """Run the CLI from the repository root so the file names it reports are relative."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_cli(args: list[str]) -> tuple[int, object]:
    """`vtdsl ARGS` in this process: (exit code, the JSON it printed on stdout or None)."""
    from click.testing import CliRunner

    from vtdsl.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return result.exit_code, {"exception": f"{type(result.exception).__name__}: {result.exception}"}
    text = result.stdout.strip()
    return result.exit_code, (json.loads(text) if text else None)


def model_names() -> list[str]:
    """The registry, as `vtdsl models --json` lists it."""
    code, payload = run_cli(["models", "--json"])
    if code != 0:
        raise SystemExit(f"vtdsl models failed with exit code {code}: {payload}")
    return [row["name"] for row in payload["models"]]


def check_record(path: str, model: str) -> dict:
    code, payload = run_cli(["check", path, "--model", model, "--json"])
    return {"exit": code, "json": payload}


def build(model: str):
    """Full-size models on the meta device; tiny ones with (seeded) weights on the CPU."""
    from vtdsl.models import get_spec

    spec = get_spec(model)
    device = "cpu" if model.startswith("tiny-") else "meta"
    return spec, spec.build(device=device, seed=WEIGHT_SEED).eval()


def compile_record(path: str, spec, model) -> dict:
    """The listing of `path` compiled onto `model`, or the refusal."""
    import vtdsl
    import vtdsl.compiler as vc

    try:
        plan = vtdsl.check(path, spec.name)
        vc.compile(plan, model, spec=spec)
    except Exception as err:  # a refusal is an outcome to keep, not a crash of the generator
        vc.uncompile(model)
        return {"error": f"{type(err).__name__}: {err}"}
    try:
        listing = vc.compiled(model).listing
        # the JSON form repeats the text's rewrites once per layer: a digest keeps the file
        # small, and the text (grouped layers) says where a difference is
        as_json = json.dumps(listing.to_json(), sort_keys=True, default=str)
        return {"text": listing.text().splitlines(), "stages": listing.stages(),
                "json_sha256": hashlib.sha256(as_json.encode()).hexdigest()}
    finally:
        vc.uncompile(model)


# ------------------------------------------------------------------ fixed forward inputs
def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def _pixels(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(PIXEL_SEED))


# The fixed batch per model, written out (not read from the spec) so that the input itself
# cannot drift with the code under test: two prompts, the second left-padded, at least 5
# text tokens each (DART's text pivots), one image each at the model's reference size.
FORWARD_SHAPES = {
    # image token id, image tokens, pixel_values shape per prompt
    "tiny-llava": (255, 576, (3, 336, 336)),
    "tiny-llava-next": (255, 88, (5, 3, 56, 56)),  # base view + 2x2 crops of a 112x112 image
    "tiny-qwen2.5-vl": (250, 64, (16 * 16, 3 * 2 * 14 * 14)),  # 224x224: 16x16 patches, 2x2 merged
}


def forward_inputs(model: str) -> dict:
    img, n, pixels = FORWARD_SHAPES[model]
    if model == "tiny-qwen2.5-vl":
        start, end = 251, 252  # vision start / end
        ids, mask = _left_padded([[5, 6, 7, start] + [img] * n + [end, 8, 9, 10],
                                  [11, 12, 13, 14, 15, start] + [img] * n + [end, 18, 19]], pad=2)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(2 * pixels[0], pixels[1]),
                    image_grid_thw=torch.tensor([[1, 16, 16]] * 2), mm_token_type_ids=(ids == img).int())
    ids, mask = _left_padded([[5, 6, 7] + [img] * n + [8, 9, 10, 11],
                              [12, 13, 14, 15, 16, 17] + [img] * n + [18]], pad=0)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(2, *pixels))
    if model == "tiny-llava-next":
        batch["image_sizes"] = torch.tensor([[112, 112]] * 2)
    return batch


def forward_record(path: str, spec, model, inputs: dict) -> dict:
    """Kept token indices per stage and a logits checksum of one compiled forward."""
    import vtdsl
    import vtdsl.compiler as vc

    plan = vtdsl.check(path, spec.name)
    torch.manual_seed(RUN_SEED)
    try:
        with vc.apply(plan, model), torch.no_grad():
            logits = model(**inputs).logits.double()
            kept = {key: value.tolist() for key, value in sorted(vc.kept_tokens(model).items())}
            counts = {tower: {k: list(v) for k, v in sorted(rows.items())}
                      for tower, rows in vc.kept_counts(model).items()}
    except Exception as err:  # noqa: BLE001 - a refusal at run time is an outcome to keep
        return {"error": f"{type(err).__name__}: {err}"}
    return {"kept": kept, "counts": counts, "logits": logits_checksum(logits)}


def logits_checksum(logits: torch.Tensor) -> dict:
    last = logits[:, -1, :]
    return {"shape": list(logits.shape), "sum": float(logits.sum()), "abs_sum": float(logits.abs().sum()),
            "last_argmax": last.argmax(-1).tolist(), "last_head": [round(float(x), 6) for x in last[:, :4].flatten()]}


# ------------------------------------------------------------------ one model's records
def model_records(model: str, paths: list[str]) -> dict:
    """{policy path: {check, compile?, forward?}} for one model."""
    spec, built = build(model)
    inputs = forward_inputs(model) if model in FORWARD_SHAPES else None
    records = {}
    for path in paths:
        entry = {"check": check_record(path, model)}
        if entry["check"]["exit"] in (0, 1):  # 1: over budget, still compiles
            entry["compile"] = compile_record(path, spec, built)
            if inputs is not None and "error" not in entry["compile"]:
                entry["forward"] = forward_record(path, spec, built, inputs)
        records[path] = entry
    return records


def write_model(out: Path, model: str, records: dict) -> Path:
    """One file per model, one policy per line (compact, but diffable line by line)."""
    target = out / f"{model}.json"
    lines = [f"{json.dumps(path)}: {json.dumps(rec, separators=(',', ':'), sort_keys=True)}"
             for path, rec in records.items()]
    target.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="directory for <model>.json")
    parser.add_argument("--model", action="append", help="only these models (repeatable)")
    parser.add_argument("--policies-from", type=Path, default=None,
                        help="repository whose policies/ and examples/ to read (default: the one holding the imported "
                             "vtdsl); lets the old code record goldens for edited policy files")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = (args.policies_from or package_root()).resolve()
    import vtdsl

    print(f"vtdsl from {vtdsl.__file__}", file=sys.stderr)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with working_directory(root):
        paths = policy_files(root)
        for model in args.model or model_names():
            target = write_model(out, model, model_records(model, paths))
            print(f"{model}: {len(paths)} policies -> {target} ({target.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
