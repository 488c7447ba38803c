"""Train tiny-llava-vtbench on vtbench (CPU). See docs/vtbench.md for the measured throughput.

    .venv/bin/python examples/train_tiny_vlm.py --threads 1 --steps 3000
    .venv/bin/python examples/train_tiny_vlm.py --help

Writes checkpoints and logs to --out (default out/train-tiny-vlm) and the final model,
tokenizer, processor and a training record to the package data dir
(vtdsl/models/data/tiny-llava-vtbench) unless --export says otherwise.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtdsl.eval.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
