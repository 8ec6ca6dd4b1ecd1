"""How many CPU threads PyTorch uses for a run, chosen once per command rather than left to OpenMP's default.

PyTorch starts one intra-op thread per core. Every parallel operator waits for its slowest thread, so when
another program holds one of the cores, each operator waits for a thread the kernel has descheduled: on a
2-core machine with one core busy, eval and training steps ran 2.6-7x slower at 2 threads than at 1
(benchmarks/THREADS.md). On that machine idle, a second thread sped up only the quickstart's training step
(1.6x), not the CamVid model's step nor inference. Hence the rule: leave one core free for the rest of the
machine, and do not count cores that the load average says are busy; on 2 cores that is one thread.

Precedence: ``--threads N``; then ``OMP_NUM_THREADS`` when set (a deliberate choice, e.g. torchrun sets it to 1
for several processes per machine), which PyTorch already applied; then the rule. On CUDA the thread count is
left to PyTorch unless ``--threads`` asks. The choice is described in one line (the "note"), which the engine
writes where the work starts (:func:`take_note`), so that a command that fails early still prints one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ovenet.errors import OvenetError

_note: str | None = None
_threads_before: int | None = None  # what configure_threads replaced, for restore_threads


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # the intra-op thread count the run uses
    source: str  # "rule", "--threads", "OMP_NUM_THREADS" (already applied by PyTorch) or "cuda" (left alone)
    reason: str = ""

    def message(self) -> str:
        return f"cpu: {self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason}); --threads N to change"


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" (no quota) or "200000 100000" (2 CPUs)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None


def choose_cpu_threads(requested: int | None = None, cores: int | None = None, load: float | None = None,
                       default: int | None = None, env: Mapping[str, str] | None = None) -> ThreadChoice:
    """The intra-op thread count for a CPU run and why (pure: every input can be given, for tests).

    ``cores``: usable cores (default :func:`usable_cores`), shared among ``LOCAL_WORLD_SIZE`` processes;
    ``load``: the 1-minute load average; ``default``: PyTorch's own count, which the rule never exceeds.
    """
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise OvenetError(f"--threads must be >= 1, got {requested}")
        return ThreadChoice(requested, "--threads", "--threads")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        return ThreadChoice(torch.get_num_threads(), "OMP_NUM_THREADS", f"OMP_NUM_THREADS={omp}")
    cores = usable_cores() if cores is None else cores
    processes = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = max(1, cores // processes)
    load = load_average() if load is None else load
    busy = 0 if load is None else math.floor(load + 0.5)
    default = torch.get_num_threads() if default is None else default
    threads = max(1, min(default, share - 1 - busy))
    reason = f"{cores} cores" + (f" for {processes} processes" if processes > 1 else "")
    reason += "" if load is None else f", load {load:.1f}"
    return ThreadChoice(threads, "rule", reason + ", one core left free")


def configure_threads(device: str | torch.device, requested: int | None = None) -> ThreadChoice:
    """Apply the choice for a run on ``device`` and keep its one-line description for :func:`take_note`.

    On CUDA only an explicit ``requested`` changes anything (there the CPU mostly feeds the GPU).
    """
    global _note, _threads_before
    if torch.device(device).type != "cpu" and requested is None:
        return ThreadChoice(torch.get_num_threads(), "cuda")
    choice = choose_cpu_threads(requested)
    if choice.source in ("rule", "--threads"):
        if _threads_before is None:
            _threads_before = torch.get_num_threads()
        torch.set_num_threads(choice.threads)
    _note = choice.message()
    return choice


def take_note() -> str | None:
    """The description of the last choice, once (then None): the engine writes it where the work starts, so
    that a command failing on its arguments still prints a single error line."""
    global _note
    note, _note = _note, None
    return note


def restore_threads() -> None:
    """Put back the thread count that :func:`configure_threads` replaced and drop an unwritten note (the CLI
    calls this when a command ends, so in-process callers such as tests see no lasting change)."""
    global _note, _threads_before
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
    _note, _threads_before = None, None


def faster_of_one_and(choice: ThreadChoice, seconds_at: Callable[[int, float], float]) -> tuple[int, float]:
    """(threads, seconds per step): ``choice``'s thread count, or one thread when timing shows it clearly faster.

    For callers that time a step anyway (the quickstart plans its iterations from one): the load average
    lags a minute behind the machine, so a core that just got busy shows in a timing before it shows there.
    ``seconds_at(n, give_up_after)`` times the step at ``n`` threads and may return early once a step took
    over ``give_up_after`` seconds (OpenMP stalls can make a step ten times slower). Only the rule's choice of
    several threads is checked: ``--threads`` and ``OMP_NUM_THREADS`` are the user's.
    """
    if choice.threads == 1 or choice.source != "rule":
        return choice.threads, seconds_at(choice.threads, math.inf)
    single = seconds_at(1, math.inf)  # first: one thread is never pathologically slow, so it bounds the second
    multi = seconds_at(choice.threads, 3 * single)
    return (1, single) if single < 0.8 * multi else (choice.threads, multi)
