"""samples.jsonl is the ledger: a request key present there has its sample. Only generate builds Sample records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def make_sample(request: SampleRequest, completion: Completion, teacher: str, template_hash: str,
                latency_s: float, attempts: int, endpoint: str | None) -> Sample:
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
        created_at=utc_now(),
    )


def failure_record(request: SampleRequest, error: str, attempts: int) -> dict[str, Any]:
    return {"prompt_id": request.prompt_id, "sample_idx": request.sample_idx, "request_key": request.key,
            "error": error, "attempts": attempts, "created_at": utc_now()}


def summarize_ledger(samples_path: Path, job_keys: set[str]) -> tuple[set[str], dict[str, Any]]:
    """One pass over the ledger: which of this job's keys have a sample, and totals over this job's samples
    from all runs (truncation must be visible, not only this run's share). The ledger may also hold samples of
    an earlier parameter set, which are not this job's."""
    finished: set[str] = set()
    total = truncated = tokens = 0
    for _, obj in iter_jsonl(samples_path):
        if obj.get("request_key") not in job_keys:
            continue
        finished.add(obj["request_key"])
        total += 1
        truncated += obj.get("finish_reason") == "length"
        tokens += (obj.get("usage") or {}).get("completion_tokens", 0)
    totals = {"truncated_total": truncated, "truncated_fraction": round(truncated / max(total, 1), 4),
              "mean_completion_tokens": round(tokens / max(total, 1), 1)}
    return finished, totals
