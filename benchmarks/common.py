"""What every benchmark records: the machine, the command, and the peak memory of a process tree."""
from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def cpu_model() -> str:
    """Vendor and model name from /proc/cpuinfo (platform.processor() is often empty on Linux): which BLAS
    kernels a CPU gets depends on it."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor()
    return " ".join(filter(None, (fields.get("vendor_id"), fields.get("model name")))) or platform.processor()


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "processor": cpu_model()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


class PeakMemory:
    """Samples the summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def _total(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return round(self.peak / 2**20, 1)


def write_report(path: str | None, name: str, results: dict, commit: str | None = None) -> dict:
    """`commit` names the code where the working copy has no .git (a copy sent to a GPU machine)."""
    from pipeline.tracking import git_commit

    report = {"benchmark": name, "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
              "commit": commit or git_commit(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return report
