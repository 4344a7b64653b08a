"""Which weights a teacher runs, as part of every request key: new weights behind the same served name must give
new samples, not silently reuse the old ones.

- a server the run launches, or the in-process engine on a local folder: the sha256 of the folder's config and
  weight files (and the launch's max_model_len);
- an endpoint we do not control: what GET /v1/models reports of the served name (vLLM: `root`, the weights it
  loaded, and `max_model_len`);
- teacher.revision, when set, for endpoints that report nothing (a hosted API) or to mark a change by hand.

An empty identity (an endpoint that reports nothing, no revision) leaves the request key as it was before
identities existed, so such ledgers keep their samples.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from cot_distill.assets import resolve_model_path
from cot_distill.config import TeacherSection
from cot_distill.records import file_sha256, stable_hash
from cot_distill.teachers.window import TeacherError, read_api_key

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt")


def model_fingerprint(folder: Path) -> str:
    """sha256 over a local model's config and weight files, by name."""
    files = sorted({path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern)} | {folder / "config.json"})
    return stable_hash({path.name: file_sha256(path) for path in files if path.is_file()})


def teacher_identity(teacher: TeacherSection) -> dict[str, Any]:
    """What this run knows of the teacher's weights; see the module docstring."""
    if teacher.backend == "vllm":
        identity = local_model_identity(teacher.model)
    elif teacher.launch is not None:
        identity = {**local_model_identity(teacher.launch.model_path), "max_model_len": teacher.launch.max_model_len}
    else:
        identity = endpoint_identity(teacher)
    if teacher.revision is not None:
        identity["revision"] = teacher.revision
    return identity


def local_model_identity(model: str) -> dict[str, Any]:
    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        return {"hub_id": model}  # vLLM downloads it; engine_kwargs' revision is already in the key
    return {"model_files": model_fingerprint(folder)}


def endpoint_identity(teacher: TeacherSection, timeout_s: float = 10.0) -> dict[str, Any]:
    """root and max_model_len of the served name, from every reachable endpoint; replicas that disagree would mix
    two teachers' samples in one ledger, so that is an error."""
    reports, unreachable = {}, []
    for base_url in teacher.base_urls:
        try:
            entries = fetch_models(base_url.rstrip("/"), read_api_key(teacher), timeout_s)
        except (OSError, ValueError) as exc:
            unreachable.append(f"{base_url}: unreachable ({exc})")
            continue
        served = {entry.get("id"): entry for entry in entries}
        if teacher.model not in served:
            raise TeacherError(f"{base_url} does not serve model {teacher.model!r} (it serves: {sorted(served)}); "
                               f"set teacher.model to the served name")
        entry = served[teacher.model]
        reports[base_url] = {key: entry[key] for key in ("root", "max_model_len") if entry.get(key) is not None}
    if not reports:
        raise TeacherError("no teacher endpoint is reachable:\n  " + "\n  ".join(unreachable))
    distinct = {json.dumps(report, sort_keys=True) for report in reports.values()}
    if len(distinct) > 1:
        raise TeacherError(f"the endpoints serve different weights under {teacher.model!r}: {reports}; one job "
                           f"needs one teacher (give each its own recipe and output_dir)")
    return next(iter(reports.values()))


def fetch_models(base_url: str, api_key: str | None, timeout_s: float) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"{base_url}/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        data = json.loads(response.read())
    return [entry for entry in data.get("data", []) if isinstance(entry, dict)]


def describe(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "no identity recorded"
    return ", ".join(f"{key}={str(value)[:16]}" for key, value in sorted(identity.items()))

