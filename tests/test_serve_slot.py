"""ServerSlot's bookkeeping: which request reuses the running server and which replaces it. Starting real servers
for every case would cost minutes each; the real path (the teacher's server reused by its eval, one server per
student) is exercised by tests/test_e2e.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cot_distill.config import LaunchSection
from cot_distill.teachers import serve


class FakeServer:
    """A real child process standing in for vLLM, so liveness checks see a real exit."""

    started: list["FakeServer"] = []

    def __init__(self, launch: LaunchSection, served_name: str) -> None:
        self.max_model_len = launch.max_model_len
        self.served_name = served_name
        self.process = None

    def start(self) -> "FakeServer":
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        FakeServer.started.append(self)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def slot(monkeypatch):
    FakeServer.started = []
    monkeypatch.setattr(serve, "server_for", lambda launch, name, log_path, seed=None: FakeServer(launch, name))
    with serve.ServerSlot() as slot:
        yield slot
    assert all(server.process.poll() is not None for server in FakeServer.started), "a server outlived its slot"


def test_same_model_with_a_shorter_context_reuses_the_server(slot, tmp_path):
    first = slot.get(LaunchSection(model_path="m", max_model_len=4096), "teacher", tmp_path / "log")
    assert slot.get(LaunchSection(model_path="m", max_model_len=2048), "teacher", tmp_path / "log") is first
    assert len(FakeServer.started) == 1


@pytest.mark.parametrize("change", [{"max_model_len": 8192}, {"model_path": "other"}, {"enforce_eager": True}])
def test_anything_the_running_server_cannot_serve_replaces_it(slot, tmp_path, change):
    first = slot.get(LaunchSection(model_path="m", max_model_len=4096), "teacher", tmp_path / "log")
    second = slot.get(LaunchSection(model_path="m", max_model_len=4096).model_copy(update=change), "teacher",
                      tmp_path / "log")
    assert second is not first and first.process.poll() is not None  # stopped before the new one started


def test_another_served_name_replaces_it(slot, tmp_path):
    launch = LaunchSection(model_path="m")
    first = slot.get(launch, "teacher", tmp_path / "log")
    assert slot.get(launch, "student", tmp_path / "log") is not first


def test_a_dead_server_is_started_again(slot, tmp_path):
    launch = LaunchSection(model_path="m")
    first = slot.get(launch, "teacher", tmp_path / "log")
    first.stop()
    assert slot.get(launch, "teacher", tmp_path / "log") is not first


@pytest.mark.parametrize("top_p, noted", [(0.95, True), (1.0, False)])
def test_top_p_below_one_on_vllm_cpu_gets_a_speed_note(monkeypatch, capsys, top_p, noted):
    from cot_distill.config import Recipe

    monkeypatch.setattr(serve, "is_vllm_cpu", lambda: True)
    recipe = Recipe.model_validate({"teacher": {"model": "m", "base_urls": ["http://127.0.0.1:1/v1"]},
                                    "data": {"prompts": "p.jsonl"}, "generate": {"sampling": {"top_p": top_p}}})
    serve.check_cpu_sampling(recipe.generate.sampling)
    assert ("top_p 1.0 with extra_body {min_p: 0.05}" in capsys.readouterr().err) is noted


@pytest.mark.parametrize("seed, extra_args, seed_values", [
    (None, [], []), (7, [], ["7"]), (7, ["--seed", "3"], ["3"]), (7, ["--seed=3"], [])])
def test_the_server_seed_goes_on_the_command_line_unless_the_user_chose_one(seed, extra_args, seed_values):
    command = serve.LocalVLLMServer("/models/m", "teacher", port=1, seed=seed, extra_args=extra_args).command()
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "--seed"] == seed_values


def test_auto_dtype_is_float32_on_vllm_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(serve, "is_vllm_cpu", lambda: True)
    for native, expected in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(serve, "cpu_dtype", lambda native=native: "bfloat16" if native else "float32")
        assert serve.serving_dtype("auto") == expected
        command = serve.LocalVLLMServer("m", "m").command()
        assert command[command.index("--dtype") + 1] == expected
    assert serve.serving_dtype("float16") == "float16"  # an explicit dtype is passed through
    monkeypatch.setattr(serve, "is_vllm_cpu", lambda: False)
    assert serve.serving_dtype("auto") == "bfloat16"  # GPU vLLM


def test_replicas_split_the_gpus_by_tensor_parallel_group(monkeypatch):
    monkeypatch.setattr(serve, "is_vllm_cpu", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    groups = [serve.replica_env(index, 2, ["--tensor-parallel-size", "2"]) for index in range(2)]
    assert groups == [{"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert serve.replica_env(2, 3, [])["CUDA_VISIBLE_DEVICES"] == "2"
    with pytest.raises(serve.ServerError, match="needs 4 GPUs; CUDA_VISIBLE_DEVICES has 3"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
        serve.replica_env(1, 2, ["--tensor-parallel-size=2"])


def test_replicas_split_the_cores_under_vllm_cpu(monkeypatch):
    monkeypatch.setattr(serve, "is_vllm_cpu", lambda: True)
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    binds = [serve.replica_env(index, 2, [])["VLLM_CPU_OMP_THREADS_BIND"] for index in range(2)]
    assert binds == ["0,1", "2,3"]


def test_replicas_go_on_while_one_lives_and_all_stop(capsys):
    replicas = serve.LocalReplicas([FakeServer(LaunchSection(model_path="m"), "t").start() for _ in range(2)])
    for server in replicas.servers:
        server.base_url, server.log_tail = "http://x/v1", lambda lines=30: "log"
    replicas.servers[0].stop()
    replicas.check_alive()  # one left: no error, one line
    replicas.check_alive()
    assert capsys.readouterr().err.count("replica 0") == 1 and not replicas.alive()
    replicas.servers[1].stop()
    with pytest.raises(serve.ServerError, match="all 2 local vLLM replicas exited"):
        replicas.check_alive()


def test_launch_replicas_builds_one_server_each_with_its_own_port_log_and_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(serve, "is_vllm_cpu", lambda: True)
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda pid: {0, 1})
    launch = LaunchSection(model_path=str(tmp_path), replicas=2, port=9100)
    replicas = serve.server_for(launch, "teacher", tmp_path / "vllm-server.log")
    assert isinstance(replicas, serve.LocalReplicas)
    assert replicas.base_urls == ["http://127.0.0.1:9100/v1", "http://127.0.0.1:9101/v1"]
    assert [server.log_path.name for server in replicas.servers] == ["vllm-server-0.log", "vllm-server-1.log"]
    assert [server.env["VLLM_CPU_OMP_THREADS_BIND"] for server in replicas.servers] == ["0", "1"]
    assert isinstance(serve.server_for(LaunchSection(model_path=str(tmp_path)), "t"), serve.LocalVLLMServer)


def test_a_replica_that_fails_to_start_stops_the_others():
    class NeverReady(FakeServer):
        def launch(self) -> None:
            self.start()

        def wait_ready(self) -> None:
            raise serve.ServerError("not ready")

    class Ready(FakeServer):
        def launch(self) -> None:
            self.start()

        def wait_ready(self) -> None:
            pass

    launch = LaunchSection(model_path="m")
    replicas = serve.LocalReplicas([Ready(launch, "t"), NeverReady(launch, "t")])
    with pytest.raises(serve.ServerError, match="not ready"):
        replicas.start()
    assert not any(server.alive() for server in replicas.servers)
