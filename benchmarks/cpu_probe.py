"""What this CPU computes fast: float32 vs bf16 matmuls, and 1 vs 2 OpenMP threads spinning or passive.

    .venv/bin/python benchmarks/cpu_probe.py            # ~1 min; run it beside a busy process to see contention

The shapes are one decode step of SmolLM2-135M at 38 sequences (30 layers of 576 -> 1536 -> 576). Each thread
setting runs in a fresh subprocess, because libgomp reads OMP_WAIT_POLICY once, when torch loads.
Last line: RESULT bf16_vs_fp32=<bf16 / fp32 matmuls per s> passive_vs_spinning=<2-thread steps/s passive / active>.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def rate(fn, seconds: float = 3.0) -> float:
    for _ in range(3):
        fn()
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - started)


def worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    x, w1, w2 = torch.randn(38, 576), torch.randn(576, 1536), torch.randn(1536, 576)

    def decode_step():
        h = x
        for _ in range(30):
            h = torch.nn.functional.layer_norm(torch.nn.functional.silu(h @ w1) @ w2, (576,))

    result = {"steps_per_s": rate(decode_step)}
    if threads == 1:
        for dtype in (torch.float32, torch.bfloat16):
            a, b = x.to(dtype), w1.to(dtype)
            result[str(dtype).removeprefix("torch.")] = rate(lambda: a @ b)
        result["capability"] = torch.backends.cpu.get_cpu_capability()
    print(json.dumps(result))


def run(threads: int, policy: str | None) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(int(sys.argv[2]))
    one = run(1, None)
    active, passive = run(2, "ACTIVE"), run(2, "PASSIVE")
    print(f"CPU capability {one['capability']}, load average {os.getloadavg()[0]:.1f}")
    print(f"matmul 38x576 @ 576x1536, 1 thread: float32 {one['float32']:.0f}/s, bfloat16 {one['bfloat16']:.0f}/s")
    print(f"decode-like step: 1 thread {one['steps_per_s']:.1f}/s, 2 threads spinning {active['steps_per_s']:.1f}/s, "
          f"2 threads passive {passive['steps_per_s']:.1f}/s")
    print(f"RESULT bf16_vs_fp32={one['bfloat16'] / one['float32']:.3f} "
          f"passive_vs_spinning={passive['steps_per_s'] / active['steps_per_s']:.2f}")


if __name__ == "__main__":
    main()
