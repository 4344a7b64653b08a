"""A model's footprint, measured by eval and reported by compare (the cost side of a comparison): parameters and
layers read from a model folder without loading weights, its size on disk, and `PeakMemory`, which watches the
memory of the server we launched.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any


def count_parameters(model_dir: Path) -> int | None:
    """Parameters stored in the folder's safetensors files, read from their headers (no weights loaded).
    Tied embeddings are stored once, so they count once."""
    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as handle:
            header_size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(header_size))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total if files else None


def count_layers(model_dir: Path) -> int | None:
    """Decoder layers, from config.json (or its text_config, for multimodal wrappers)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")


def describe_local_model(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        return {"path": str(model_dir), "parameters": None, "layers": None, "size_on_disk_bytes": None}
    # Top-level files only: a train folder also holds student_init/, checkpoint-*/ or merged/, which are not
    # part of the model that is served.
    size = sum(path.stat().st_size for path in model_dir.iterdir() if path.is_file())
    return {"path": str(model_dir), "parameters": count_parameters(model_dir), "layers": count_layers(model_dir),
            "size_on_disk_bytes": size}


class PeakMemory:
    """Watches a process tree (the server we launched) and keeps the peak of its summed RSS, plus the peak GPU
    memory in use on the machine above what was in use before, where nvidia-smi exists. RSS counts shared pages
    once per process, so it is an upper bound; vLLM preallocates its KV cache, so GPU memory shows that budget
    (gpu_memory_utilization), not what the model strictly needs."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_bytes = 0
        self.peak_gpu_bytes: int | None = None
        self._gpu_baseline = self._gpu_used_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = 0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                rss += process.memory_info().rss
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        used = self._gpu_used_bytes()
        if used is not None and self._gpu_baseline is not None:
            self.peak_gpu_bytes = max(self.peak_gpu_bytes or 0, used - self._gpu_baseline)

    @staticmethod
    def _gpu_used_bytes() -> int | None:
        if shutil.which("nvidia-smi") is None:
            return None
        result = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return None
        return sum(int(line) for line in result.stdout.split() if line.strip().isdigit()) * 2**20

    def report(self) -> dict[str, Any]:
        return {"available": True, "rss_bytes": self.peak_rss_bytes, "gpu_bytes": self.peak_gpu_bytes,
                "scope": "the launched vLLM server's process tree (RSS); GPU: machine-wide use above the baseline"}
