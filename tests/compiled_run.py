"""One forward of a compiled tiny model, measured: what the compiler tests compare with
the cost model and with their plain references. (plain_refs holds what never touches
vtdsl; this helper runs vtdsl's compiler.)"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc


def counted_forward(model, policy, **inputs) -> tuple[int, dict, dict]:
    """`model` compiled with `policy`, one forward of `inputs` under FlopCounterMode:
    (counted FLOPs, `kept_tokens`, `kept_counts`)."""
    with vc.apply(policy, model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
        kept = {k: v.clone() for k, v in vc.kept_tokens(model).items()}
        counts = vc.kept_counts(model)
    return counter.get_total_flops(), kept, counts
