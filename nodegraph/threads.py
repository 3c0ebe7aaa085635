"""The thread policy: how many intra-op threads torch uses for the work at hand.

torch starts with one intra-op thread per core. For small models that is the wrong choice on a small CPU,
and a ruinous one when the CPU is shared: every op waits at OpenMP's barrier for whichever of its threads
another process has descheduled, and a small model's ops are too short to gain from a second thread
anyway (measured on a busy 2-core machine: one small convolution 22–32 ms on 2 threads, 1.0–1.7 ms on 1;
`bench/threads.py` measures it on yours). So:

- `--threads N` (or `NODEGRAPH_THREADS=N`): N threads for everything, always.
- `OMP_NUM_THREADS=N` set before start, with neither of those: left to torch, which reads it.
- otherwise (`auto`): 1 thread while the largest model in use holds less than `SMALL_MODEL` bytes (the demo
  models, small ControlNets), every core the process may run on for larger ones.

The model manager applies it whenever a model starts or stops being used (`ModelManager.use`), for the
largest model in use at that moment. torch is imported only when a count is set, so commands that never
compute (validate, nodes) never import it.
"""

from __future__ import annotations

import os

from nodegraph.sizes import OptionError

SMALL_MODEL = 256 * 2**20  # below this many bytes of weights, one thread is faster on any CPU measured


class ThreadsError(OptionError):
    """A thread count that is not a positive whole number."""


def parse_threads(text: str | int | None, option: str = "--threads") -> int | None:
    """A thread count as given on the command line or in the environment: "auto"/None, or a positive int."""
    if text is None or text == "auto" or text == "":
        return None
    try:
        count = int(text)
    except (TypeError, ValueError):
        raise ThreadsError(f"{option} must be auto or a positive whole number, not {text!r}") from None
    if count < 1:
        raise ThreadsError(f"{option} must be auto or a positive whole number, not {count}")
    return count


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class ThreadPolicy:
    """Picks and sets torch's intra-op thread count; `requested` None is `auto`."""

    def __init__(self, requested: int | None = None) -> None:
        if requested is None:
            requested = parse_threads(os.environ.get("NODEGRAPH_THREADS"), "NODEGRAPH_THREADS")
        self.requested = requested
        # An OMP_NUM_THREADS the user set is theirs: auto leaves torch alone then.
        self.hands_off = requested is None and bool(os.environ.get("OMP_NUM_THREADS"))

    def describe(self) -> str:
        if self.requested is not None:
            return f"{self.requested} (--threads)"
        if self.hands_off:
            return f"{os.environ['OMP_NUM_THREADS']} (OMP_NUM_THREADS)"
        return f"auto: 1 for models under {SMALL_MODEL // 2**20} MiB, else {machine_cores()}"

    def count_for(self, model_bytes: int) -> int | None:
        """The thread count for work whose largest model holds `model_bytes`; None: leave torch as it is."""
        if self.requested is not None:
            return self.requested
        if self.hands_off:
            return None
        return 1 if model_bytes < SMALL_MODEL else machine_cores()

    def apply(self, model_bytes: int) -> None:
        count = self.count_for(model_bytes)
        if count is None:
            return
        import torch

        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
