"""Wall-clock time spent inside vtdsl's own code during a forward of a compiled model.

`HookTimer(model)` (after `vtdsl.compiler.compile`) wraps, in place and reversibly,

- every forward (pre-)hook the compile registered (found by diffing the hook dicts of
  every module against a snapshot taken before compiling: `HookTimer.snapshot(model)`),
- the forwards of the fx nodes it inserted into the vision encoder (``vtdsl_vit_*``),
- as a nested sub-total, "score + select": the time spent in the score functions
  (`VitRuntime.observe`, `LlmRuntime._observe`: attention rows, norms) and in
  `vtdsl.compiler.runtime.execute` (selection, gather / merge of one stage), counted once
  where one calls the other.

On the CPU every op runs synchronously on the calling thread, so a clock around a hook
measures the hook's ops. Both the process CPU time (``process_time``; the headline with
one torch thread, insensitive to other processes taking our core) and the wall-clock time
are summed. A timer costs ~3 µs per call (a few dozen calls per forward). Used by bench_prefill.py for the overhead share (issue 8, item 2).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable


def _hook_dicts(module) -> list[tuple[str, dict]]:
    return [
        ("pre", module._forward_pre_hooks),
        ("post", module._forward_hooks),
    ]


class HookTimer:
    def __init__(self, model, before: dict, label: Callable[[str, str], str] | None = None):
        import vtdsl.compiler.llm as llm_mod
        import vtdsl.compiler.runtime as runtime_mod
        import vtdsl.compiler.vit as vit_mod

        self.totals: dict[str, float] = defaultdict(float)  # CPU seconds per site
        self.walls: dict[str, float] = defaultdict(float)  # wall seconds per site
        self.calls: dict[str, int] = defaultdict(int)
        self.stage = 0.0  # CPU time in score functions and execute(): scores + selection + gather/merge
        self.stage_wall = 0.0
        self._undo: list[Callable[[], None]] = []
        for path, module in model.named_modules():
            for kind, hooks in _hook_dicts(module):
                old = before.get((path, kind), set())
                for hid in list(hooks):
                    if hid in old:
                        continue
                    name = f"{path or '<model>'}:{kind}"
                    hooks[hid] = self._wrap(name, hooks[hid])
                    self._undo.append(lambda hooks=hooks, hid=hid, fn=hooks[hid]: hooks.__setitem__(hid, fn.__wrapped__))
            if path.rpartition(".")[2].startswith("vtdsl_vit_"):
                fwd = module.forward
                module.forward = self._wrap(f"{path}:fx", fwd)
                self._undo.append(lambda module=module: module.__dict__.pop("forward", None))
        self._depth = 0
        # every stage runs through runtime.execute (called by ForwardLog.run)
        original = runtime_mod.execute
        runtime_mod.execute = self._wrap_stage(original)
        self._undo.append(lambda original=original: setattr(runtime_mod, "execute", original))
        for cls, attr in ((vit_mod.VitRuntime, "observe"), (llm_mod.LlmRuntime, "_observe")):
            original = cls.__dict__[attr]
            setattr(cls, attr, self._wrap_stage(original))
            self._undo.append(lambda cls=cls, attr=attr, original=original: setattr(cls, attr, original))

    @staticmethod
    def snapshot(model) -> dict:
        """Hook ids present before compiling (so that only vtdsl's are timed)."""
        return {
            (path, kind): set(hooks)
            for path, module in model.named_modules()
            for kind, hooks in _hook_dicts(module)
        }

    def _wrap(self, name: str, fn):
        totals, walls, calls = self.totals, self.walls, self.calls

        def timed(*args: Any, **kwargs: Any):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.process_time() - c0
                walls[name] += time.perf_counter() - w0
                calls[name] += 1

        timed.__wrapped__ = fn
        return timed

    def _wrap_stage(self, fn):
        # only the outermost of nested score/stage calls is timed (union of their time)
        def timed(*args: Any, **kwargs: Any):
            self._depth += 1
            if self._depth == 1:
                w0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.stage += time.process_time() - c0
                    self.stage_wall += time.perf_counter() - w0

        return timed

    def reset(self) -> None:
        self.totals.clear()
        self.walls.clear()
        self.calls.clear()
        self.stage = self.stage_wall = 0.0

    @property
    def total(self) -> float:
        return sum(self.totals.values())

    @property
    def total_wall(self) -> float:
        return sum(self.walls.values())

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


class PartTimer:
    """CPU time of whole sub-modules of a LLaVA model per forward (pre/post hooks).

    Registered after compiling, so a part's pre-hook runs after vtdsl's pre-hook on the
    same module (the projector's `vit.out` stage is then vtdsl time, not projector time).
    """

    PARTS = {
        "vit": "model.vision_tower",
        "projector": "model.multi_modal_projector",
        "llm": "model.language_model",
        "lm_head": "lm_head",
    }

    def __init__(self, model):
        self.totals: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, path in self.PARTS.items():
            module = model.get_submodule(path)
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self._start[name] = time.process_time()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.totals[name] += time.process_time() - self._start.pop(name)

        return hook

    def reset(self) -> None:
        self.totals.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
