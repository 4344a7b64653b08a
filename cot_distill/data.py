"""Prompt loading: local JSONL / JSON / parquet files or a hub dataset id, with field mapping.

Every row is validated before the first request is sent; a bad row fails with its file, line and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from cot_distill.config import DataSection
from cot_distill.records import Prompt, RecordError, iter_jsonl, stable_hash

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _iter_local_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row) where location is 'file:line' (JSONL) or 'file:row N' (JSON, parquet)."""
    if path.suffix == ".jsonl":
        for line_no, obj in iter_jsonl(path, tolerate_torn_tail=False):
            yield f"{path}:{line_no}", obj
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rows, list):
            raise RecordError(f"{path}: expected a JSON list of objects")
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RecordError(f"{path}: row {index}: expected an object, got {type(row).__name__}")
            yield f"{path}: row {index}", row
    else:
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {index}", row


def _iter_hub_rows(section: DataSection) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        dataset = datasets.load_dataset(section.prompts, section.config_name, split=section.split)
    except Exception as exc:  # the hub raises many types; the user needs the id and the reason
        raise RecordError(f"cannot load dataset {section.prompts!r} (split {section.split!r}): {exc}") from None
    for index, row in enumerate(dataset):
        yield f"{section.prompts}[{section.split}]: row {index}", row


def _text_field(row: dict[str, Any], field: str, location: str, *, required: bool) -> str | None:
    if field not in row or row[field] is None:
        if required:
            raise RecordError(f"{location}: missing field {field!r} (present: {', '.join(sorted(row)) or 'none'})")
        return None
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"{location}: field {field!r} must be text or a number, got {type(value).__name__}")
    text = str(value)
    if required and not text.strip():
        raise RecordError(f"{location}: field {field!r} is empty")
    return text


def iter_rows_as_prompts(rows: Iterable[tuple[str, dict[str, Any]]], section: DataSection,
                         source: str) -> Iterator[Prompt]:
    """Prompts from (location, row) pairs, each checked as it is read; a duplicate id names both locations."""
    fields = section.fields
    seen_ids: dict[str, str] = {}
    for index, (location, row) in enumerate(rows):
        if section.limit is not None and len(seen_ids) >= section.limit:
            return
        problem = _text_field(row, fields.problem, location, required=True)
        answer = _text_field(row, fields.answer, location, required=True) if fields.answer else None
        if fields.id:
            prompt_id = _text_field(row, fields.id, location, required=True)
        else:
            prompt_id = stable_hash([source, index, problem])[:16]
        if prompt_id in seen_ids:
            raise RecordError(f"{location}: field {fields.id!r}: duplicate id {prompt_id!r} "
                              f"(first at {seen_ids[prompt_id]})")
        seen_ids[prompt_id] = location
        mapped = {f for f in (fields.id, fields.problem, fields.answer) if f}
        meta = {k: v for k, v in row.items() if k not in mapped and isinstance(v, (str, int, float, bool))}
        yield Prompt(id=prompt_id, problem=problem, answer=answer, source=source, meta=meta)


def rows_to_prompts(rows: Iterable[tuple[str, dict[str, Any]]], section: DataSection, source: str) -> list[Prompt]:
    return list(iter_rows_as_prompts(rows, section, source))


def iter_prompts(section: DataSection) -> Iterator[Prompt]:
    """The data section's prompts one at a time, each validated. Raises RecordError naming file, line and field."""
    path = Path(section.prompts)
    is_local = path.suffix in LOCAL_SUFFIXES or path.exists()
    if is_local:
        if not path.exists():
            raise RecordError(f"prompt file {path} does not exist")
        if path.suffix not in LOCAL_SUFFIXES:
            raise RecordError(f"{path}: unsupported prompt file type (use {', '.join(LOCAL_SUFFIXES)})")
        rows = _iter_local_rows(path)
        source = section.source or path.stem
    else:
        rows = _iter_hub_rows(section)
        source = section.source or section.prompts
    return iter_rows_as_prompts(rows, section, source)


def load_prompts(section: DataSection) -> list[Prompt]:
    """All prompts of the data section, validated. Raises RecordError naming file, line and field."""
    prompts = list(iter_prompts(section))
    if not prompts:
        raise RecordError(f"{section.prompts}: no prompts found")
    return prompts


class PromptStream:
    """The data section's prompts, read from the file each time they are iterated, never all held at once: what
    generate streams a job of millions of prompts from. Built by one validation pass over every row (a bad row
    fails here, before any request is sent), which also counts them for len(). `keep`: a filter on prompt ids
    (a shard's)."""

    def __init__(self, section: DataSection, keep: Callable[[str], bool] | None = None):
        self.section, self.keep = section, keep
        rows = kept = 0
        for prompt in iter_prompts(section):
            rows += 1
            kept += keep is None or keep(prompt.id)
        if not rows:  # a shard may hold none of them; the file itself must hold some
            raise RecordError(f"{section.prompts}: no prompts found")
        self.count = kept

    def __iter__(self) -> Iterator[Prompt]:
        for prompt in iter_prompts(self.section):
            if self.keep is None or self.keep(prompt.id):
                yield prompt

    def __len__(self) -> int:
        return self.count
