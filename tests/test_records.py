import json

import pytest

from cot_distill.records import (
    JsonlWriter,
    RecordError,
    invalidate_manifest,
    iter_jsonl,
    read_manifest,
    repair_torn_tail,
    write_manifest,
)


def test_writer_appends_one_line_per_record(tmp_path):
    path = tmp_path / "a.jsonl"
    with JsonlWriter(path) as writer:
        writer.write({"a": 1})
        writer.write({"a": 2})
    with JsonlWriter(path) as writer:
        writer.write({"a": 3})
    assert [obj["a"] for _, obj in iter_jsonl(path)] == [1, 2, 3]


def test_torn_last_line_is_repaired_on_reopen(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": "tor')
    with JsonlWriter(path) as writer:
        assert writer.repaired_bytes == len('{"a": 3, "b": "tor')
        writer.write({"a": 4})
    assert [obj["a"] for _, obj in iter_jsonl(path)] == [1, 2, 4]


def test_repair_of_a_file_with_no_newline_empties_it(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1')
    assert repair_torn_tail(path) == 7
    assert path.read_text() == ""


def test_reader_tolerates_torn_tail_but_not_a_bad_middle_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')
    assert [obj["a"] for _, obj in iter_jsonl(path)] == [1]
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(RecordError, match=r"a.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))


def test_manifest_written_last_and_invalidated(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    manifest = write_manifest(tmp_path, stage="x", recipe={"k": 1}, counts={"n": 1}, files=["data.jsonl"])
    assert manifest["complete"] and set(manifest["files"]) == {"data.jsonl"}
    assert read_manifest(tmp_path)["counts"] == {"n": 1}
    assert json.loads((tmp_path / "manifest.json").read_text())["stage"] == "x"
    invalidate_manifest(tmp_path)
    assert read_manifest(tmp_path) is None
