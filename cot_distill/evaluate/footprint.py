"""A model's footprint, measured by eval and reported by compare (the cost side of a comparison): parameters and
layers read from a model folder without loading weights, its size on disk, `PeakMemory`, which watches the memory
of the server we launched (its own processes: RSS on CPU, and on GPU the device memory nvidia-smi attributes to
them), and `single_request_latency`, the same fixed-length requests one at a time for every model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# compressed-tensors (cot-distill quantize) stores each quantized weight with scales, zero points and its shape,
# and 4-bit weights packed eight to an int32: those are not parameters of the model.
QUANTIZATION_TENSORS = ("_scale", "_zero_point", "_shape", "_g_idx")


def count_parameters(model_dir: Path) -> int | None:
    """Parameters stored in the folder's safetensors files, read from their headers (no weights loaded).
    Tied embeddings are stored once, so they count once. A compressed-tensors folder counts its weights as the
    model has them (a packed int32 holds 32/num_bits of them), not its quantization scales."""
    total = 0
    files = sorted(model_dir.glob("*.safetensors"))
    per_packed = 32 // packed_bits(model_dir)
    for path in files:
        with open(path, "rb") as handle:
            header_size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(header_size))
        for name, entry in header.items():
            if name == "__metadata__" or name.endswith(QUANTIZATION_TENSORS):
                continue
            total += math.prod(entry["shape"]) * (per_packed if name.endswith("weight_packed") else 1)
    return total if files else None


def packed_bits(model_dir: Path) -> int:
    """The weight bits of a compressed-tensors pack-quantized folder (4 for w4a16), or 32 (nothing packed)."""
    try:
        config = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return 32
    if config.get("format") != "pack-quantized":
        return 32
    bits = {group.get("weights", {}).get("num_bits") for group in config.get("config_groups", {}).values()}
    return bits.pop() if len(bits) == 1 and None not in bits else 32


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
    """Watches a process tree (the server we launched) and keeps the peak of its summed RSS and, where nvidia-smi
    exists, the peak of the GPU memory nvidia-smi attributes to those processes (per process, on every device: not
    a machine-wide delta, which other jobs would move). RSS counts shared pages once per process, so it is an upper
    bound. vLLM preallocates its KV cache (VLLM_CPU_KVCACHE_SPACE on CPU, gpu_memory_utilization or
    --kv-cache-memory-bytes on GPU): the figures are weights plus that budget, comparable across models served
    with the same launch settings and max_model_len (which `cot-distill run` gives every model)."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_bytes = 0
        self.peak_gpu_bytes: int | None = None
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
        used = gpu_bytes_of({process.pid for process in processes})
        if used is not None:
            self.peak_gpu_bytes = max(self.peak_gpu_bytes or 0, used)

    def report(self) -> dict[str, Any]:
        return {"available": True, "rss_bytes": self.peak_rss_bytes, "gpu_bytes": self.peak_gpu_bytes,
                "scope": "the launched vLLM server's own processes: summed RSS, and the GPU memory nvidia-smi "
                         "attributes to them"}


def gpu_bytes_of(pids: set[int]) -> int | None:
    """GPU memory (all devices) nvidia-smi attributes to these processes; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True)
    return parse_compute_apps(result.stdout, pids) if result.returncode == 0 else None


def parse_compute_apps(text: str, pids: set[int]) -> int:
    """Sum of used_memory (MiB, as nvidia-smi prints it) over the lines "pid, used_memory" of these pids."""
    total = 0
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[0]) in pids:
            total += int(fields[1]) * 2**20
    return total


def single_request_latency(base_url: str, model: str, conversations: list[list[dict[str, str]]], max_tokens: int,
                           api_key_env: str | None = None, timeout_s: float = 600) -> dict[str, Any]:
    """Each conversation sent alone, one after another, greedy, for exactly max_tokens tokens (vLLM's ignore_eos,
    so a model that answers briefly does not look fast): seconds per request (p50, p95, mean) and single-stream
    tokens/s. An endpoint that refuses ignore_eos is measured without it, and the result says so."""
    headers = {"Content-Type": "application/json"}
    if api_key_env and os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    fixed_length, latencies, tokens = True, [], 0
    for messages in conversations:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        try:
            seconds, generated = _timed_request(base_url, {**body, "ignore_eos": fixed_length}, headers, timeout_s)
        except urllib.error.HTTPError as error:
            if error.code != 400 or not fixed_length:
                raise
            fixed_length = False  # not vLLM: lengths then vary by model
            seconds, generated = _timed_request(base_url, body, headers, timeout_s)
        latencies.append(seconds)
        tokens += generated
    ordered = sorted(latencies)
    return {"requests": len(latencies), "max_tokens": max_tokens, "fixed_length": fixed_length,
            "latency_s": {"p50": round(statistics.median(ordered), 4),
                          "p95": round(ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)], 4),
                          "mean": round(statistics.fmean(ordered), 4)},
            "tokens_per_s": round(tokens / sum(latencies), 1) if sum(latencies) > 0 else None}


def _timed_request(base_url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float) -> tuple[float, int]:
    request = urllib.request.Request(f"{base_url.rstrip('/')}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data = json.loads(response.read())
    return time.perf_counter() - started, int((data.get("usage") or {}).get("completion_tokens") or 0)
