"""The requests of a generate job: prompts x samples, each keyed by a hash of everything that determines it.

A request key hashes the rendered messages, the teacher's model and backend, every sampling parameter, the
template hash and the sample index, and the teacher's identity (its weights: teachers/identity.py) when it has
one. Endpoint URLs, keys and concurrency are left out: they change where and how fast a sample is made, not what
it is.
"""

from __future__ import annotations

from typing import Any, Iterable

from cot_distill.config import GenerateSection, Recipe, SamplingSection, TeacherSection
from cot_distill.data import load_prompts
from cot_distill.prompts import PromptTemplate, load_template
from cot_distill.records import Prompt, SampleRequest, stable_hash


def params_for(sampling: SamplingSection, sample_idx: int) -> dict[str, Any]:
    """The sampling parameters of one sample: a set seed becomes seed + sample_idx, so each sample differs."""
    params = sampling.model_dump(mode="json")
    if params["seed"] is not None:
        params["seed"] = params["seed"] + sample_idx
    return params


def request_key(messages: list[dict[str, str]], teacher: TeacherSection, params: dict[str, Any],
                template_hash: str, sample_idx: int, identity: dict[str, Any] | None = None) -> str:
    """An empty identity gives the key of ledgers written before identities existed, so they keep their samples."""
    key = stable_hash({
        "messages": messages,
        "model": teacher.model,
        "backend": teacher.backend,
        "engine_kwargs": teacher.engine_kwargs if teacher.backend == "vllm" else None,
        "params": params,
        "template_hash": template_hash,
        "sample_idx": sample_idx,
    })
    return stable_hash({"request": key, "teacher_identity": identity}) if identity else key


def plan_requests(prompts: Iterable[Prompt], template: PromptTemplate, teacher: TeacherSection,
                  gen: GenerateSection, identity: dict[str, Any] | None = None) -> list[SampleRequest]:
    """Every request of the job, in prompt order, `gen.samples_per_prompt` per prompt. `identity`: the
    teacher's (teachers.identity.teacher_identity)."""
    requests = []
    for prompt in prompts:
        messages = template.render(prompt.problem)
        for sample_idx in range(gen.samples_per_prompt):
            params = params_for(gen.sampling, sample_idx)
            key = request_key(messages, teacher, params, template.hash, sample_idx, identity)
            requests.append(SampleRequest(prompt.id, sample_idx, messages, params, key))
    return requests


def build_requests(recipe: Recipe) -> tuple[list[SampleRequest], str, int]:
    """All requests of a recipe's job, the template hash and the prompt count. Loading the prompts validates
    every row, so bad input fails before any request is sent."""
    prompts = load_prompts(recipe.data)
    template = load_template(recipe.generate.prompt_template)
    return plan_requests(prompts, template, recipe.teacher, recipe.generate), template.hash, len(prompts)
