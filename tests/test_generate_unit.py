"""Generate-stage logic that needs no server: request keys, prompt validation, response parsing, routing."""

import asyncio

import pytest

from cot_distill.config import DataSection, load_recipe
from cot_distill.data import load_prompts
from cot_distill.generate import build_requests
from cot_distill.reasoning import split_reasoning
from cot_distill.records import RecordError
from cot_distill.teachers.openai_compat import EndpointPool, TransientError, parse_completion


def recipe_for(tmp_path, prompts, *overrides):
    path = tmp_path / "r.yaml"
    path.write_text(f"teacher: {{model: m}}\ndata: {{prompts: {prompts}, fields: {{id: id}}}}\n")
    return load_recipe(path, list(overrides))


def test_request_keys_are_stable_and_change_with_any_sampling_parameter(tmp_path, prompts_file):
    base, _, _ = build_requests(recipe_for(tmp_path, prompts_file))
    again, _, _ = build_requests(recipe_for(tmp_path, prompts_file, "generate.concurrency=3",
                                            "teacher.base_urls=[http://other:1/v1]"))
    assert [r.key for r in base] == [r.key for r in again]  # where/how fast is not part of the key
    assert len({r.key for r in base}) == len(base) == 12 * 4
    for override in ("generate.sampling.temperature=0.7", "generate.sampling.max_tokens=100",
                     "generate.sampling.top_p=0.9", "generate.sampling.stop=[x]", "teacher.model=m2",
                     "generate.sampling.extra_body={top_k: 20}", "generate.prompt_template=r1-math"):
        changed, _, _ = build_requests(recipe_for(tmp_path, prompts_file, override))
        assert not {r.key for r in changed} & {r.key for r in base}, override


def test_seed_is_offset_per_sample(tmp_path, prompts_file):
    requests, _, _ = build_requests(recipe_for(tmp_path, prompts_file, "generate.sampling.seed=10"))
    assert [r.params["seed"] for r in requests[:4]] == [10, 11, 12, 13]


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "problem": "x", "answer": "1"}\n{"id": "b", "answer": "2"}\n', r":2: missing field 'problem'"),
    ('{"id": "a", "problem": "x", "answer": "1"}\n{"id": "b", "problem": "y"\n', r":2: not valid JSON"),
    ('{"id": "a", "problem": "x", "answer": "1"}\n{"id": "a", "problem": "y", "answer": "2"}\n',
     r":2: field 'id': duplicate id 'a' \(first at .*:1\)"),
    ('{"id": "a", "problem": "", "answer": "1"}\n', r":1: field 'problem' is empty"),
    ('{"id": "a", "problem": ["x"], "answer": "1"}\n', r":1: field 'problem' must be text"),
    ('[1, 2]\n', r":1: expected a JSON object"),
])
def test_bad_prompt_rows_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError, match=message):
        load_prompts(DataSection(prompts=str(path), fields={"id": "id"}))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        load_prompts(DataSection(prompts=str(tmp_path / "missing.jsonl")))


def test_field_mapping_and_generated_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q1", "target": 3, "extra": "e"}\n{"question": "q2", "target": 4.5}\n')
    prompts = load_prompts(DataSection(prompts=str(path), fields={"problem": "question", "answer": "target"}))
    assert [(p.problem, p.answer) for p in prompts] == [("q1", "3"), ("q2", "4.5")]
    assert prompts[0].meta == {"extra": "e"} and prompts[0].source == "p"
    assert len({p.id for p in prompts}) == 2


@pytest.mark.parametrize("text, expected", [
    ("<think>r</think>answer", ("r", "answer", True)),
    ("r only closed</think> ans", ("r only closed", "ans", True)),
    ("<think>never closes", ("never closes", "", False)),
    ("plain answer", (None, "plain answer", True)),
])
def test_split_reasoning(text, expected):
    assert tuple(split_reasoning(text)) == expected


def test_parse_completion_prefers_server_reasoning_fields():
    data = {"choices": [{"message": {"content": "42", "reasoning_content": "think"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    completion = parse_completion(data)
    assert (completion.reasoning, completion.content, completion.text) == ("think", "42", "<think>think</think>42")
    newer = {"choices": [{"message": {"content": None, "reasoning": "cut off"}, "finish_reason": "length"}]}
    cut = parse_completion(newer)
    assert cut.reasoning == "cut off" and cut.content == "" and cut.reasoning_closed is False
    with pytest.raises(TransientError, match="malformed"):
        parse_completion({"error": "x"})


def test_pool_routes_to_fewest_outstanding_and_ejects_failing_endpoints():
    async def scenario():
        pool = EndpointPool.from_urls(["http://a/v1", "http://b/v1"], eject_after_failures=2,
                                      eject_cooldown_s=60, give_up_after_s=60)
        first, second = await pool.acquire(), await pool.acquire()
        assert {first.base_url, second.base_url} == {"http://a/v1", "http://b/v1"}
        pool.release(first, failed=True)
        pool.release(second, failed=False)
        again = await pool.acquire()
        pool.release(again, failed=again is first)
        bad = pool.endpoints[0] if pool.endpoints[0] is first else pool.endpoints[1]
        while bad.ejections == 0:
            endpoint = await pool.acquire()
            pool.release(endpoint, failed=endpoint is bad)
        assert pool.live_count() == 1
        for _ in range(5):  # while ejected, everything goes to the live one
            endpoint = await pool.acquire()
            assert endpoint is not bad
            pool.release(endpoint, failed=False)

    asyncio.run(scenario())


def test_parquet_prompts_with_field_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"uid": ["a", "b"], "question": ["q1", "q2"], "gold": ["1", None]}), path)
    section = DataSection(prompts=str(path), fields={"id": "uid", "problem": "question", "answer": "gold"})
    with pytest.raises(RecordError, match=r"p.parquet: row 1: missing field 'gold'"):
        load_prompts(section)
    section.limit = 1
    assert [(p.id, p.problem, p.answer) for p in load_prompts(section)] == [("a", "q1", "1")]


@pytest.mark.parametrize("backend, seed, identity", [("openai", None, {}), ("vllm", 7, {"root": "/m", "n": 1}),
                                                     ("openai", 3, {"revision": "r\u00e9v"})])
def test_the_request_plan_makes_exactly_request_keys(backend, seed, identity):
    """RequestPlan's keys must be the documented hashes that older ledgers were keyed by, or every sample
    written before would be resent."""
    from cot_distill.config import GenerateSection, TeacherSection
    from cot_distill.generate import RequestPlan, params_for, request_key
    from cot_distill.prompts import load_template
    from cot_distill.records import Prompt, stable_hash

    def key_by_the_formula(messages, teacher, params, template_hash, sample_idx, identity):
        key = stable_hash({"messages": messages, "model": teacher.model, "backend": teacher.backend,
                           "engine_kwargs": teacher.engine_kwargs if teacher.backend == "vllm" else None,
                           "params": params, "template_hash": template_hash, "sample_idx": sample_idx})
        return stable_hash({"request": key, "teacher_identity": identity}) if identity else key

    teacher = TeacherSection(backend=backend, model="m\u00fcnchen/\"q\"", engine_kwargs={"max_model_len": 512})
    gen = GenerateSection(samples_per_prompt=3, sampling={"seed": seed, "extra_body": {"min_p": 0.05, "z": [1]}})
    template = load_template(gen.prompt_template)
    prompts = [Prompt(id=f"p{i}", problem=f"What is {i} + \u00bd? \\boxed{{}}\n\"quoted\"", answer="1",
                      source="s") for i in range(4)]
    planned = list(RequestPlan(prompts, template, teacher, gen, identity))
    assert len(planned) == 12
    for request in planned:
        prompt = prompts[int(request.prompt_id[1:])]
        params = params_for(gen.sampling, request.sample_idx)
        assert request.params == params
        args = (template.render(prompt.problem), teacher, params, template.hash, request.sample_idx, identity)
        assert request.key == key_by_the_formula(*args) == request_key(*args)
