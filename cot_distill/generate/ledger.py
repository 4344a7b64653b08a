"""samples.jsonl is the ledger: a request key present there has its sample. Only generate builds Sample records.

failures.jsonl records every request that ran out of attempts; those marked `permanent` (the server rejected the
request for good) are not resent on reruns unless generate.retry_failed asks for it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from cot_distill.records import Completion, Sample, SampleRequest, Usage, iter_jsonl, repair_torn_tail, utc_now

SAMPLES_FILE = "samples.jsonl"
FAILURES_FILE = "failures.jsonl"
STATS_FILE = "stats.json"


def done_keys(samples_path: Path) -> set[str]:
    """The ledger: request keys that already have a sample. Repairs a torn last line first."""
    if not samples_path.exists():
        return set()
    repair_torn_tail(samples_path)
    return {obj["request_key"] for _, obj in iter_jsonl(samples_path) if obj.get("request_key")}


def permanent_failures(failures_path: Path) -> dict[str, dict[str, Any]]:
    """request key -> its newest permanent failure record."""
    if not failures_path.exists():
        return {}
    repair_torn_tail(failures_path)
    return {obj["request_key"]: obj for _, obj in iter_jsonl(failures_path)
            if obj.get("permanent") and obj.get("request_key")}


def failure_reasons(failures: Iterable[dict[str, Any]], top: int = 10) -> dict[str, int]:
    """The commonest reasons, as 'HTTP 400: <first 120 characters>' -> count, for stats.json and the manifest."""
    return dict(Counter(str(failure.get("error", ""))[:120] for failure in failures).most_common(top))


def other_teacher_samples(samples_path: Path, pending: list[SampleRequest],
                          identity: dict[str, Any]) -> Counter:
    """Ledger samples of the pending (prompt, sample index) slots that another teacher identity made, by that
    identity (None: made before identities were recorded). Samples of other sampling parameters are not counted:
    those are a different job, not other weights."""
    slots = {(request.prompt_id, request.sample_idx) for request in pending}
    found: Counter = Counter()
    for _, obj in iter_jsonl(samples_path):
        made_by = obj.get("teacher_identity")
        if (obj.get("prompt_id"), obj.get("sample_idx")) in slots and made_by != identity:
            found[repr(made_by) if made_by else None] += 1
    return found


def make_sample(request: SampleRequest, completion: Completion, teacher: str, template_hash: str,
                latency_s: float, attempts: int, endpoint: str | None,
                teacher_identity: dict[str, Any] | None = None) -> Sample:
    return Sample(
        prompt_id=request.prompt_id,
        sample_idx=request.sample_idx,
        request_key=request.key,
        teacher=teacher,
        params=request.params,
        template_hash=template_hash,
        reasoning=completion.reasoning,
        content=completion.content,
        text=completion.text,
        reasoning_closed=completion.reasoning_closed,
        finish_reason=completion.finish_reason,
        usage=Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens),
        latency_s=round(latency_s, 4),
        attempts=attempts,
        endpoint=endpoint,
        teacher_identity=teacher_identity or None,
        created_at=utc_now(),
    )


def failure_record(request: SampleRequest, error: str, attempts: int, permanent: bool = False,
                   status: int | None = None) -> dict[str, Any]:
    return {"prompt_id": request.prompt_id, "sample_idx": request.sample_idx, "request_key": request.key,
            "error": error, "attempts": attempts, "permanent": permanent, "status": status,
            "created_at": utc_now()}


def summarize_ledger(samples_path: Path, job_keys: set[str]) -> tuple[set[str], dict[str, Any]]:
    """One pass over the ledger: which of this job's keys have a sample, and totals over this job's samples
    from all runs (truncation must be visible, not only this run's share). The ledger may also hold samples of
    an earlier parameter set, which are not this job's."""
    finished: set[str] = set()
    total = truncated = tokens = prompt_tokens = 0
    for _, obj in iter_jsonl(samples_path) if samples_path.exists() else ():  # a first run has no ledger yet
        if obj.get("request_key") not in job_keys:
            continue
        finished.add(obj["request_key"])
        total += 1
        truncated += obj.get("finish_reason") == "length"
        usage = obj.get("usage") or {}
        tokens += usage.get("completion_tokens", 0)
        prompt_tokens += usage.get("prompt_tokens", 0)
    totals = {"truncated_total": truncated, "truncated_fraction": round(truncated / max(total, 1), 4),
              "mean_completion_tokens": round(tokens / max(total, 1), 1),
              "completion_tokens_total": tokens, "prompt_tokens_total": prompt_tokens}
    return finished, totals
