"""samples.jsonl is the ledger: a request key present there has its sample. Only generate builds Sample records.

failures.jsonl records every request that ran out of attempts; those marked `permanent` (the server rejected the
request for good) are not resent on reruns unless generate.retry_failed asks for it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cot_distill.logprob_store import repair_torn_tail as repair_store
from cot_distill.records import (
    Completion,
    JsonlWriter,
    Sample,
    SampleRequest,
    Usage,
    iter_jsonl,
    repair_torn_tail,
    utc_now,
)

SAMPLES_FILE = "samples.jsonl"
FAILURES_FILE = "failures.jsonl"
STATS_FILE = "stats.json"


def compact_key(key: str) -> bytes:
    """A request key as 16 bytes instead of a 64-character string: a job's key set is ~85 bytes a request, not
    ~150 (4M requests: 340 MB). 128 bits keep collisions out of reach (~1e-26 for 4M keys)."""
    return bytes.fromhex(key[:32])


@dataclass
class LedgerScan:
    """What a job needs to know of its ledger before it sends anything, read in one pass (a 1M-sample ledger
    takes seconds per pass): the keys it has (compact_key), the tokens spent, and the samples of this job's
    parameters that other weights made (other_weights: see made_by_other_weights). `own`: how many samples are this
    job's teacher's (all of them without `teachers:`), which is what its resume point and log line count."""

    keys: set[bytes] = field(default_factory=set)
    own: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    other_weights: Counter = field(default_factory=Counter)
    link_end: int = 0  # where the furthest logprob record a row links to ends (generate.logprobs)


def scan_ledger(samples_path: Path, identity: dict[str, Any], template_hash: str,
                params_by_index: list[dict[str, Any]], teacher_name: str | None = None) -> LedgerScan:
    """One pass over samples.jsonl (after repairing a torn last line). `teacher_name`: this job's teacher among
    several (`teachers:`); the others' samples are theirs, not samples of other weights."""
    scan = LedgerScan()
    if not samples_path.exists():
        return scan
    repair_torn_tail(samples_path)
    for _, obj in iter_jsonl(samples_path):
        if obj.get("request_key"):
            scan.keys.add(compact_key(obj["request_key"]))
        link = obj.get("logprobs")
        if link:
            scan.link_end = max(scan.link_end, int(link["offset"]) + int(link["bytes"]))
        usage = obj.get("usage") or {}
        scan.prompt_tokens += usage.get("prompt_tokens", 0)
        scan.completion_tokens += usage.get("completion_tokens", 0)
        if obj.get("teacher_name") != teacher_name:
            continue
        scan.own += bool(obj.get("request_key"))
        made_by = made_by_other_weights(obj, identity, template_hash, params_by_index)
        if made_by is not False:
            scan.other_weights[made_by] += 1
    return scan


LOST_SAMPLES_FILE = "samples.lost.jsonl"  # ledger rows whose logprob records were lost, kept aside


def drop_samples_whose_records_were_lost(samples_path: Path, store_path: Path, link_end: int) -> int:
    """Each logprob record reaches the OS before the ledger row that links it, so kill -9 never parts them; a power
    loss or a node crash can: the OS may have put the ledger's newer pages on disk and not the store's. The store's
    repair then cuts the lost records off, and their rows would link past its end (or, once new records are
    appended there, to another sample's). Such rows are moved out of the ledger into samples.lost.jsonl (the ledger
    rewritten, then swapped in), so their requests are sent again. `link_end`: LedgerScan.link_end; nothing is read
    when the store reaches it. A missing store is left alone: that is a store deleted or not copied, not a crash,
    and re-requesting every sample would spend the whole job's teacher time again. Returns how many rows moved."""
    if not store_path.exists():
        return 0
    repair_store(store_path)
    size = store_path.stat().st_size
    if link_end <= size:
        return 0
    kept_path, dropped = samples_path.with_name(samples_path.name + ".rewrite"), 0
    kept_path.unlink(missing_ok=True)
    with JsonlWriter(kept_path) as kept, JsonlWriter(samples_path.with_name(LOST_SAMPLES_FILE)) as lost:
        for _, obj in iter_jsonl(samples_path):
            link = obj.get("logprobs")
            lost_record = link and int(link["offset"]) + int(link["bytes"]) > size
            (lost if lost_record else kept).write(obj)
            dropped += bool(lost_record)
    os.replace(kept_path, samples_path)
    return dropped


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


def made_by_other_weights(obj: dict[str, Any], identity: dict[str, Any], template_hash: str,
                          params_by_index: list[dict[str, Any]]) -> str | None | bool:
    """For a ledger sample with this job's template and sampling parameters that another teacher identity made:
    that identity (repr), or None when it was made before identities were recorded; False for any other sample.
    Those are the samples this job would have reused before the weights were part of the key; samples of other
    parameters are a different job, not other weights."""
    made_by, index = obj.get("teacher_identity"), obj.get("sample_idx")
    if made_by == (identity or None) or obj.get("template_hash") != template_hash:
        return False
    if not (isinstance(index, int) and 0 <= index < len(params_by_index)) or obj.get("params") != params_by_index[index]:
        return False
    return repr(made_by) if made_by else None


def make_sample(request: SampleRequest, completion: Completion, teacher: str, template_hash: str,
                latency_s: float, attempts: int, endpoint: str | None,
                teacher_identity: dict[str, Any] | None = None, logprobs: dict[str, Any] | None = None,
                teacher_name: str | None = None) -> Sample:
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
        logprobs=logprobs,
        teacher_name=teacher_name,
    )


def failure_record(request: SampleRequest, error: str, attempts: int, permanent: bool = False,
                   status: int | None = None) -> dict[str, Any]:
    return {"prompt_id": request.prompt_id, "sample_idx": request.sample_idx, "request_key": request.key,
            "error": error, "attempts": attempts, "permanent": permanent, "status": status,
            "created_at": utc_now()}


def summarize_ledger(samples_path: Path, job_keys: set[bytes]) -> tuple[set[bytes], dict[str, Any]]:
    """One pass over the ledger: which of this job's keys (compact_key) have a sample, and totals over those
    samples from all runs (truncation must be visible, not only this run's share). The ledger
    may also hold samples of an earlier parameter set, which are not this job's."""
    finished: set[bytes] = set()
    total = truncated = tokens = prompt_tokens = 0
    for _, obj in iter_jsonl(samples_path) if samples_path.exists() else ():  # a first run has no ledger yet
        key = compact_key(obj.get("request_key") or "")
        if key not in job_keys:
            continue
        finished.add(key)
        total += 1
        truncated += obj.get("finish_reason") == "length"
        usage = obj.get("usage") or {}
        tokens += usage.get("completion_tokens", 0)
        prompt_tokens += usage.get("prompt_tokens", 0)
    totals = {"truncated_total": truncated, "truncated_fraction": round(truncated / max(total, 1), 4),
              "mean_completion_tokens": round(tokens / max(total, 1), 1),
              "completion_tokens_total": tokens, "prompt_tokens_total": prompt_tokens}
    return finished, totals
