import json

import pytest

from cot_distill.records import (
    JsonlWriter,
    Prompt,
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


def test_torn_tail_is_skipped_only_when_tolerated(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2, "b": "tor')
    assert list(iter_jsonl(path)) == [(1, {"a": 1})]
    with pytest.raises(RecordError, match=r"a.jsonl:3: not valid JSON"):
        list(iter_jsonl(path, tolerate_torn_tail=False))


def test_bad_last_line_with_newline_is_not_a_torn_tail(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(RecordError, match=r"a.jsonl:2: not valid JSON \(Expecting"):
        list(iter_jsonl(path))


def test_malformed_middle_line_error_names_file_and_physical_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\n{"a": 1}\n   \n{"a": \n{"a": 3}\n')
    with pytest.raises(RecordError) as info:
        list(iter_jsonl(path))
    assert str(info.value).startswith(f"{path}:4: not valid JSON (")
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n{"a": 3}\n')  # not UTF-8
    with pytest.raises(RecordError, match=r"a.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))


def test_blank_lines_are_skipped_and_line_numbers_stay_exact(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('\n{"a": 1}\n  \n\t\n{"a": 2}\n\n{"a": 3}')
    assert list(iter_jsonl(path)) == [(2, {"a": 1}), (5, {"a": 2}), (7, {"a": 3})]


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ("null", "NoneType"), ('"x"', "str"), ("3", "int")])
def test_non_object_line_is_an_error(tmp_path, line, kind):
    path = tmp_path / "a.jsonl"
    path.write_text(f'{{"a": 1}}\n\n{line}\n')
    with pytest.raises(RecordError, match=rf"a.jsonl:3: expected a JSON object, got {kind}$"):
        list(iter_jsonl(path))


def test_reader_keeps_the_json_loads_rules_where_jsonlines_differs(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\x1e{"a": 2}\n')  # jsonlines alone would strip the RFC 7464 separator
    with pytest.raises(RecordError, match=r"a.jsonl:2: not valid JSON"):
        list(iter_jsonl(path))
    path.write_bytes(b'{"a": "\xed\xa0\x80"}\n{"a": 2}\n')  # a surrogate json.loads(bytes) has always let through
    assert [n for n, _ in iter_jsonl(path)] == [1, 2]


def test_writer_output_is_unescaped_utf8_identical_to_json_dumps(tmp_path):
    path = tmp_path / "a.jsonl"
    records = [{"s": "é ∑ 数学 — 🙂", "n": [1, 2.5, None, True]}, {"t": "line\nbreak \"quoted\""}]
    with JsonlWriter(path) as writer:
        for record in records:
            writer.write(record)
    data = path.read_bytes()
    assert data == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    assert b"\\u" not in data and "数学".encode() in data
    assert [obj for _, obj in iter_jsonl(path)] == records


def test_writer_accepts_pydantic_models(tmp_path):
    path = tmp_path / "a.jsonl"
    with JsonlWriter(path) as writer:
        writer.write(Prompt(id="p1", problem="2+2 ∑", answer="4"))
    assert [obj for _, obj in iter_jsonl(path)] == [
        {"id": "p1", "problem": "2+2 ∑", "answer": "4", "source": "", "meta": {}}]


def test_writer_hands_each_record_to_the_file_in_one_write(tmp_path):
    path = tmp_path / "a.jsonl"
    writer = JsonlWriter(path, fsync_every=2)
    calls = []
    real_write = writer._handle.write

    def counting_write(text):
        calls.append(text)
        return real_write(text)

    writer._handle.write = counting_write
    big = {"text": "x" * 50_000}  # larger than the io buffer: two writes would reach the OS separately
    for record in ({"a": 1}, big, {"a": 3}):
        writer.write(record)
        assert path.read_bytes().endswith(b"\n")  # flushed at once, whole line
    writer.close()
    assert len(calls) == 3
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in calls)
    assert [obj for _, obj in iter_jsonl(path)] == [{"a": 1}, big, {"a": 3}]


def test_write_after_close_raises_value_error(tmp_path):
    writer = JsonlWriter(tmp_path / "a.jsonl")
    writer.close()
    writer.close()
    with pytest.raises(ValueError):
        writer.write({"a": 1})
