"""The teacher as an in-process `vllm.LLM` engine (no server).

vLLM batches internally, so we hand it chunks of requests and write each chunk's samples as soon as the chunk
returns: a crash loses at most one chunk. The engine starts its own worker process, so a script calling this
must sit under `if __name__ == "__main__":` (the cot-distill console script does).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from cot_distill.assets import resolve_model_path
from cot_distill.config import SamplingSection, TeacherSection
from cot_distill.reasoning import split_reasoning
from cot_distill.records import Completion
from cot_distill.teachers.serve import check_cpu_sampling, cpu_engine_env, serving_dtype

CHAT_KWARGS = {"chat_template_kwargs"}  # extra_body keys that go to llm.chat(), not to SamplingParams


def to_sampling_params(params: dict[str, Any]):
    from vllm import SamplingParams

    known = set(SamplingParams.__struct_fields__)
    extra = {k: v for k, v in (params.get("extra_body") or {}).items() if k not in CHAT_KWARGS}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"generate.sampling.extra_body keys not understood by vllm.SamplingParams: {unknown}")
    base = {k: params[k] for k in ("temperature", "top_p", "max_tokens", "seed", "stop") if params.get(k) is not None}
    return SamplingParams(n=1, **base, **extra)


def to_completion(output) -> Completion:
    choice = output.outputs[0]
    reasoning, answer, closed = split_reasoning(choice.text)
    return Completion(
        text=choice.text,
        reasoning=reasoning,
        content=answer,
        reasoning_closed=closed,
        finish_reason=choice.finish_reason,
        prompt_tokens=len(output.prompt_token_ids or []),
        completion_tokens=len(choice.token_ids),
    )


def run_in_process(teacher: TeacherSection, sampling: SamplingSection, concurrency: int, pending: list,
                   on_sample: Callable[..., None], engine_seed: int | None = None,
                   on_engine_ready: Callable[[], None] | None = None) -> None:
    """Run `pending` SampleRequests on an in-process engine. Each completion goes back through
    `on_sample(request, completion, latency_s, attempts, endpoint)`; the caller builds and writes the record."""
    from vllm import LLM

    check_cpu_sampling(sampling)
    # engine_seed: see generate.resume_seed; a seed in engine_kwargs was chosen on purpose and wins.
    engine_kwargs = {"dtype": serving_dtype("auto"), **({"seed": engine_seed} if engine_seed is not None else {}),
                     **teacher.engine_kwargs}
    cpu_engine_env(os.environ)  # read by the engine process it spawns
    llm = LLM(model=resolve_model_path(teacher.model), **engine_kwargs)
    if on_engine_ready is not None:
        on_engine_ready()
    chat_kwargs = {k: v for k, v in (sampling.extra_body or {}).items() if k in CHAT_KWARGS}
    chunk_size = max(concurrency, 1)
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start:start + chunk_size]
        started = time.monotonic()
        outputs = llm.chat([request.messages for request in chunk],
                           [to_sampling_params(request.params) for request in chunk], use_tqdm=False, **chat_kwargs)
        # Latency of an offline batch is the batch's wall time: the engine does not time single requests.
        latency = time.monotonic() - started
        for request, output in zip(chunk, outputs):
            on_sample(request, to_completion(output), latency, 1, None)
