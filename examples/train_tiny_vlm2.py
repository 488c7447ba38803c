"""Train tiny-llava-vtbench2 on vtbench v2 (CPU, 2 threads): the whole recipe in one command.

    .venv/bin/python examples/train_tiny_vlm2.py --export vtdsl/models/data/tiny-llava-vtbench2
    .venv/bin/python examples/train_tiny_vlm2.py --resume --export ...    # after an interruption
    .venv/bin/python examples/train_tiny_vlm2.py --help

Checkpoints go to --out (default out/train-tiny-vlm2) every --ckpt-every steps; docs/vtbench.md
gives the projected time and the recipe (vtdsl/eval/train2.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtdsl.eval.train2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
