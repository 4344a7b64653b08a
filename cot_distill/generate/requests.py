"""The requests of a generate job: prompts x samples, each keyed by a hash of everything that determines it.

A request key hashes the rendered messages, the teacher's model and backend, every sampling parameter, the
template hash and the sample index, and the teacher's identity (its weights: teachers/identity.py) when it has
one. Endpoint URLs, keys and concurrency are left out: they change where and how fast a sample is made, not what
it is.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator

from cot_distill.config import GenerateSection, Recipe, SamplingSection, TeacherSection
from cot_distill.data import load_prompts
from cot_distill.prompts import PromptTemplate, load_template
from cot_distill.records import Prompt, SampleRequest, canonical_json


def params_for(sampling: SamplingSection, sample_idx: int, logprobs: int | None = None) -> dict[str, Any]:
    """The request parameters of one sample: the sampling section, with a set seed made seed + sample_idx (so each
    sample differs), and generate.logprobs when set (absent otherwise: keys of jobs without it stay as they were)."""
    params = sampling.model_dump(mode="json")
    if params["seed"] is not None:
        params["seed"] = params["seed"] + sample_idx
    if logprobs is not None:
        params["logprobs"] = logprobs
    return params


def request_key(messages: list[dict[str, str]], teacher: TeacherSection, params: dict[str, Any],
                template_hash: str, sample_idx: int, identity: dict[str, Any] | None = None) -> str:
    """One request's key (KeyMaker builds it). An empty identity gives the key of ledgers written before
    identities existed, so they keep their samples."""
    keys = KeyMaker(teacher, template_hash, identity)
    return keys.key(keys.prompt_prefix(messages), params, sample_idx)


class KeyMaker:
    """Request keys: stable_hash of {messages, model, backend, engine_kwargs (in-process only), params,
    template_hash, sample_idx}, then stable_hash of {request: that key, teacher_name} for a named teacher (an entry
    of `teachers:`), then stable_hash of {request: that key, teacher_identity} when the identity is not empty
    (tests check each against stable_hash itself). Built from JSON pieces serialised once per job or once
    per prompt instead of once per request. A 1M-prompt job computes its keys in seconds, not minutes:
    what a resume over a big ledger waits for before its first new request."""

    def __init__(self, teacher: TeacherSection, template_hash: str, identity: dict[str, Any] | None):
        engine_kwargs = teacher.engine_kwargs if teacher.backend == "vllm" else None
        # stable_hash's dict, keys in sorted order: backend, engine_kwargs, messages, model, params, sample_idx,
        # template_hash.
        self.head = f'{{"backend":{canonical_json(teacher.backend)},"engine_kwargs":{canonical_json(engine_kwargs)}'
        self.model = f',"model":{canonical_json(teacher.model)},"params":'
        self.tail = f',"template_hash":{canonical_json(template_hash)}}}'
        self.identity = canonical_json(identity) if identity else None
        self.name = canonical_json(teacher.name) if teacher.name is not None else None
        self._params_json: tuple[int, str] | None = None

    def prompt_prefix(self, messages: list[dict[str, str]]) -> str:
        return f'{self.head},"messages":{canonical_json(messages)}{self.model}'

    def key(self, prefix: str, params: dict[str, Any], sample_idx: int) -> str:
        blob = f'{prefix}{self.params_json(params)},"sample_idx":{sample_idx}{self.tail}'
        key = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        if self.name is not None:
            named = f'{{"request":"{key}","teacher_name":{self.name}}}'
            key = hashlib.sha256(named.encode("utf-8")).hexdigest()
        if self.identity is None:
            return key
        outer = f'{{"request":"{key}","teacher_identity":{self.identity}}}'
        return hashlib.sha256(outer.encode("utf-8")).hexdigest()

    def params_json(self, params: dict[str, Any]) -> str:
        # Without a seed every sample has the same parameters: serialise them once.
        if params.get("seed") is not None:
            return canonical_json(params)
        if self._params_json is None or self._params_json[0] != id(params):
            self._params_json = (id(params), canonical_json(params))
        return self._params_json[1]


class RequestPlan:
    """Every request of a job, in prompt order, `gen.samples_per_prompt` per prompt, made as it is iterated: a job
    of millions of prompts holds only the requests in flight, not all of them. Iterate it again for the same
    requests; len() is the job's size. `prompts`: a list, or anything re-iterable with a len (data.PromptStream)."""

    def __init__(self, prompts, template: PromptTemplate, teacher: TeacherSection, gen: GenerateSection,
                 identity: dict[str, Any] | None = None):
        self.prompts, self.template, self.teacher, self.gen, self.identity = prompts, template, teacher, gen, identity

    def __len__(self) -> int:
        return len(self.prompts) * self.gen.samples_per_prompt

    def __iter__(self) -> Iterator[SampleRequest]:
        keys = KeyMaker(self.teacher, self.template.hash, self.identity)
        logprobs = self.gen.logprobs
        unseeded = params_for(self.gen.sampling, 0, logprobs) if self.gen.sampling.seed is None else None
        for prompt in self.prompts:
            messages = self.template.render(prompt.problem)
            prefix = keys.prompt_prefix(messages)
            for sample_idx in range(self.gen.samples_per_prompt):
                params = unseeded if unseeded is not None else params_for(self.gen.sampling, sample_idx, logprobs)
                yield SampleRequest(prompt.id, sample_idx, messages, params, keys.key(prefix, params, sample_idx))


def plan_requests(prompts: Iterable[Prompt], template: PromptTemplate, teacher: TeacherSection,
                  gen: GenerateSection, identity: dict[str, Any] | None = None) -> list[SampleRequest]:
    """Every request of the job as a list (see RequestPlan). `identity`: the teacher's
    (teachers.identity.teacher_identity)."""
    return list(RequestPlan(list(prompts), template, teacher, gen, identity))


def build_requests(recipe: Recipe) -> tuple[list[SampleRequest], str, int]:
    """All requests of a recipe's job, the template hash and the prompt count. Loading the prompts validates
    every row, so bad input fails before any request is sent."""
    prompts = load_prompts(recipe.data)
    template = load_template(recipe.generate.prompt_template)
    return plan_requests(prompts, template, recipe.teacher, recipe.generate), template.hash, len(prompts)
