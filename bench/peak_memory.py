"""Peak memory over a stretch of a bench run: CUDA allocations on a GPU, the resident set size on a CPU."""

from __future__ import annotations

import threading
import time


class PeakMemory:
    """Peak memory over a stretch of the run: CUDA allocations on a GPU, resident set size on a CPU.


    On Linux the kernel's resident high-water mark (VmHWM) is reset through /proc/self/clear_refs, so
    the peak is exact and covers only what follows the reset; elsewhere a thread samples the RSS.
    `mark()` starts a nested window (the stage-2 candidate compression) without losing the outer peak.
    """

    def __init__(self, device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self._outer = 0
        self._sampler = None
        self._sampled = 0
        self._use_proc = False
        if self.kind == "rss":
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self._use_proc = True
            except OSError:
                self._use_proc = False
        if self.kind == "rss" and not self._use_proc:
            self.kind = "rss_sampled"

    def current(self) -> int:
        import torch

        if self.kind == "cuda_allocated":
            return torch.cuda.memory_allocated(self.device)
        if self._use_proc:
            return self._status("VmRSS")
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def _window_peak(self) -> int:
        import torch

        if self.kind == "cuda_allocated":
            return torch.cuda.max_memory_allocated(self.device)
        if self._use_proc:
            return self._status("VmHWM")
        return max(self._sampled, self.current())

    def _reset_window(self) -> None:
        import torch

        if self.kind == "cuda_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._use_proc:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        else:
            self._sampled = self.current()

    def _sample(self) -> None:
        while self._sampler is not None:
            self._sampled = max(self._sampled, self.current())
            time.sleep(0.001)

    def start(self) -> int:
        """Forget earlier peaks; returns the memory in use now."""
        self._outer = 0
        self._reset_window()
        if self.kind == "rss_sampled" and self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self.current()

    def mark(self) -> int:
        """Start a nested window: fold the peak so far into the outer peak; returns the memory in use now."""
        self._outer = max(self._outer, self._window_peak())
        self._reset_window()
        return self.current()

    def window_peak(self) -> int:
        return self._window_peak()

    def peak(self) -> int:
        return max(self._outer, self._window_peak())

    def stop(self) -> None:
        self._sampler = None
