"""Timing windows and peak memory, the same way for every phase of the benchmark."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass
class Timing:
    """Seconds per step of each timed window (warm-up windows already dropped)."""

    window_s_per_step: list[float]
    batch_size: int
    first_window_s: float | None = None  # seconds of the first (warm-up) window: compiling happens in it
    window_steps: int = 0
    # The process's CPU seconds per step of each window (interleaved runs): on a loaded machine the wall clock
    # also counts the time other programs had the cores, the CPU time mostly does not.
    window_cpu_s_per_step: list[float] | None = None

    @property
    def s_per_step(self) -> float:
        return statistics.median(self.window_s_per_step)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.s_per_step

    @property
    def first_window_extra_s(self) -> float | None:
        """What the first window took beyond the same steps at the median speed: the first compile, mostly."""
        if self.first_window_s is None:
            return None
        return self.first_window_s - self.window_steps * self.s_per_step

    def to_dict(self) -> dict:
        result = {"s_per_step": round(self.s_per_step, 5), "images_per_s": round(self.images_per_s, 3),
                  "window_s_per_step": [round(t, 5) for t in self.window_s_per_step],
                  "spread": round((max(self.window_s_per_step) - min(self.window_s_per_step)) / self.s_per_step, 3)}
        if self.window_cpu_s_per_step:
            result.update(cpu_s_per_step=round(statistics.median(self.window_cpu_s_per_step), 5),
                          window_cpu_s_per_step=[round(t, 5) for t in self.window_cpu_s_per_step])
        if self.first_window_s is not None:
            result.update(first_window_s=round(self.first_window_s, 2),
                          first_window_extra_s=round(self.first_window_extra_s, 2))
        return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(step: Callable[[], object], device: torch.device, window_steps: int,
                cpu: list[float] | None = None) -> float:
    """Seconds per step over one window of `window_steps` steps; the device is synchronised at its edges only.
    `cpu`: the process's CPU seconds per step are appended to it."""
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(window_steps):
        step()
    sync(device)
    if cpu is not None:
        cpu.append((time.process_time() - start_cpu) / window_steps)
    return (time.perf_counter() - start) / window_steps


def time_windows(step: Callable[[], object], device: torch.device, *, warmup_windows: int, windows: int,
                 window_steps: int, batch_size: int, after_warmup: Callable[[], None] | None = None) -> Timing:
    """`warmup_windows` untimed windows, then `windows` timed ones."""
    first = [time_window(step, device, window_steps) * window_steps for _ in range(warmup_windows)]
    sync(device)
    if after_warmup is not None:
        after_warmup()
    return Timing([time_window(step, device, window_steps) for _ in range(windows)], batch_size,
                  first[0] if first else None, window_steps)


def windows_from_marks(marks: list[float], window_steps: int, warmup_windows: int, batch_size: int,
                       resumed: list[float] | None = None, first_start: float | None = None) -> Timing:
    """Timing from the times at which each window ended (e.g. the trainer's progress events). `resumed`: when
    the next window started, where other work ran between windows (default: at once, `marks`). `first_start`:
    when the first window started (the trainer's `started` event), for `first_window_s`."""
    starts = marks if resumed is None else resumed
    durations = [(end - start) / window_steps for start, end in zip(starts, marks[1:], strict=False)]
    first = marks[0] - first_start if first_start is not None and marks else None
    return Timing(durations[max(0, warmup_windows - 1):], batch_size, first, window_steps)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _peak_rss_bytes() -> int | None:
    """VmHWM: the peak resident set since the last reset (Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # "reset the peak resident set size to the current RSS"
        return True
    except OSError:
        return False


def release_memory(device: torch.device) -> None:
    """Give freed memory back before the next phase, so that each phase's peak is its own."""
    torch._dynamo.reset()  # compiled graphs hold on to their modules
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # glibc: hand freed heap pages back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryProbe:
    """Peak memory of one phase in segments (e.g. setup, steps, finish): process RSS on the CPU, allocated and
    reserved on a CUDA device. `mark(name)` closes the segment so far under that name and starts the next one;
    the peak counters are process-wide, so probes must not nest."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict = {"segments": {}}

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_peak_rss():
            self.result["note"] = "peak RSS could not be reset: each figure is the process peak so far"

    def _peak(self) -> dict:
        if self.device.type == "cuda":
            return {"allocated_gib": round(torch.cuda.max_memory_allocated(self.device) / GIB, 3),
                    "reserved_gib": round(torch.cuda.max_memory_reserved(self.device) / GIB, 3)}
        peak = _peak_rss_bytes()
        return {"rss_gib": peak and round(peak / GIB, 3)}

    def __enter__(self) -> MemoryProbe:
        release_memory(self.device)
        if self.device.type == "cuda":
            self.result["start_allocated_gib"] = round(torch.cuda.memory_allocated(self.device) / GIB, 3)
        else:
            rss = _rss_bytes()
            self.result["start_rss_gib"] = rss and round(rss / GIB, 3)
        self._reset()
        return self

    def mark(self, name: str) -> None:
        self.result["segments"][name] = self._peak()
        self._reset()

    def __exit__(self, *exc) -> None:
        self.mark("finish")
        segments = self.result["segments"].values()
        self.result["peak"] = {key: max((s[key] for s in segments if s.get(key) is not None), default=None)
                               for key in next(iter(segments))}

    def segment(self, name: str) -> dict:
        return self.result["segments"].get(name, {})
