"""`vtdsl run` from a cold start and `vtdsl eval --data`'s share of time in the model, on
the shipped tiny-llava-vtbench.

    .venv/bin/python benchmarks/bench_run_eval.py [--repeats 3] [--examples 500]

1. Cold start: `python -m vtdsl run policies/fastv.vt --image ... --question ...` as a new
   process, `--repeats` times: wall clock and the process's CPU time (user + sys), medians.
   Interpreter start, imports, loading the weights and the processor, the compile and the
   answer all count.
2. `vtdsl eval policies/fastv.vt --data FILE --json` on `--examples` vtbench validation
   examples written as a JSONL file with PNGs (the unpruned model and FastV: 2 x N
   answers): the summed time in `generate` (the model's forwards, image encoding
   included) over the command's wall clock, and over the evaluation loop alone (in
   process, the model already loaded).

Writes results/run_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

POLICY = str(C.ROOT / "policies" / "fastv.vt")


def write_data(directory: Path, n: int) -> Path:
    from vtdsl.eval.bench import generate

    (directory / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(generate("val", n)):
        ex.image.save(directory / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "question": ex.question, "answer": ex.answer,
                                 "tag": ex.family}))
    path = directory / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed_process(args: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds of one child process, and its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vtdsl", *args], env=env, capture_output=True, text=True,
                         check=True, cwd=C.ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout


def cold_start(data: Path, repeats: int) -> dict:
    first = json.loads(data.read_text().splitlines()[0])
    image = str(data.parent / first["image"])
    runs = [timed_process(["run", POLICY, "--image", image, "--question", first["question"]])
            for _ in range(repeats)]
    return {"wall_s": [round(w, 3) for w, _, _ in runs], "cpu_s": [round(c, 3) for _, c, _ in runs],
            "median_wall_s": round(statistics.median(w for w, _, _ in runs), 3),
            "median_cpu_s": round(statistics.median(c for _, c, _ in runs), 3),
            "answer": runs[0][2].strip(), "expected": first["answer"]}


def eval_share(data: Path) -> dict:
    wall, cpu, out = timed_process(["eval", POLICY, "--data", str(data), "--json"])
    result = json.loads(out)
    in_model = sum(r["generate_s"] for r in result["results"])
    return {"command_wall_s": round(wall, 3), "command_cpu_s": round(cpu, 3), "generate_s": round(in_model, 3),
            "share_of_command": round(in_model / wall, 4),
            "exact": {r["policy"]: r["exact"] for r in result["results"]}}


def loop_share(data: Path) -> dict:
    """The evaluation loop alone, in this process (model loaded beforehand)."""
    from vtdsl.cli.check_cmd import load_plan
    from vtdsl.eval.data import evaluate_data, read_jsonl
    from vtdsl.models.loading import load_pretrained

    loaded = load_pretrained("tiny-llava-vtbench", device="cpu")
    plan, _, _ = load_plan(POLICY, loaded.spec)
    examples = read_jsonl(data)
    t0 = time.perf_counter()
    result = evaluate_data(loaded, [("fastv", plan)], examples, progress=False)
    wall = time.perf_counter() - t0
    in_model = sum(r["generate_s"] for r in result["results"])
    return {"loop_wall_s": round(wall, 3), "generate_s": round(in_model, 3), "share_of_loop": round(in_model / wall, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=500)
    args = parser.parse_args()
    record = {"machine": C.header("vtdsl run (cold start) and vtdsl eval --data (time in the model)"),
              "examples": args.examples}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), args.examples)
        record["cold_start"] = cold_start(data, args.repeats)
        record["eval_data"] = eval_share(data)
        record["eval_loop"] = loop_share(data)
    record["load_average_after"] = [round(x, 2) for x in C.load_average()]
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=2))
    C.save("run_eval", record)


if __name__ == "__main__":
    main()
