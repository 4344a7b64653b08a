"""Shards of a generate job: `cot-distill generate RECIPE --shard I/N` on each of N nodes (a Slurm job array, or
any scheduler), one output between them.

Shard I takes the prompts whose id hashes to I modulo N (sha256 of the id, so the split is the same on every
machine and for every run, whatever the file order) and writes its own ledger, stats and manifest under
OUTPUT_DIR/shard-I-of-N/. Every shard resumes on its own. The stages after generate read a generate output
through `generate_parts`: the folder itself, or all N shard folders, and they refuse while a shard lacks its
manifest, since a missing shard looks like a smaller job.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cot_distill.config.generate import parse_shard
from cot_distill.errors import UserError
from cot_distill.generate.ledger import SAMPLES_FILE
from cot_distill.records import read_manifest

SHARD_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")


class ShardError(UserError, ValueError):
    """A generate output whose shards do not add up; the message names the folder and what is missing."""


@dataclass(frozen=True)
class Part:
    """One ledger of a generate output: the whole job, or one shard of it."""

    folder: Path
    manifest: dict[str, Any] | None

    @property
    def samples_path(self) -> Path:
        return self.folder / SAMPLES_FILE


def shard_spec(shard: str | None) -> tuple[int, int] | None:
    """generate.shard ("I/N") as (I, N), or None for an unsharded job."""
    return parse_shard(shard) if shard else None


def shard_folder(output_dir: str | Path, index: int, count: int) -> Path:
    return Path(output_dir) / f"shard-{index}-of-{count}"


def shard_of(prompt_id: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % count


def shard_folders(output_dir: Path) -> dict[int, list[Path]]:
    """N -> the shard-I-of-N folders under output_dir."""
    found: dict[int, list[Path]] = {}
    for child in sorted(output_dir.iterdir()) if output_dir.is_dir() else ():
        match = SHARD_DIR.match(child.name)
        if match and child.is_dir():
            found.setdefault(int(match[2]), []).append(child)
    return found


def generate_parts(output_dir: str | Path) -> list[Part]:
    """The ledgers of a generate output: [the folder] for an unsharded job, else every shard-I-of-N folder, all N
    of them (a ShardError otherwise). A part's manifest is None while it is unfinished."""
    output_dir = Path(output_dir)
    sharded = shard_folders(output_dir)
    if not sharded:
        return [Part(output_dir, read_manifest(output_dir))]
    if len(sharded) > 1:
        raise ShardError(f"{output_dir} holds shards of different splits ({sorted(sharded)} shards): keep one")
    if (output_dir / SAMPLES_FILE).exists():
        raise ShardError(f"{output_dir} holds both an unsharded {SAMPLES_FILE} and shard folders: keep one")
    (count, folders), = sharded.items()
    missing = sorted(set(range(count)) - {int(SHARD_DIR.match(folder.name)[1]) for folder in folders})
    if missing:
        raise ShardError(f"{output_dir}: shards {missing} of {count} have not been started (run `cot-distill "
                         f"generate RECIPE --shard I/{count}` for each)")
    return [Part(folder, read_manifest(folder)) for folder in folders]


def unfinished(parts: list[Part]) -> list[Path]:
    return [part.folder for part in parts if part.manifest is None]


def combined_manifest(parts: list[Part]) -> dict[str, Any] | None:
    """One manifest for all parts, its counts summed; None while a part is unfinished."""
    if unfinished(parts):
        return None
    if len(parts) == 1:
        return parts[0].manifest
    counts: dict[str, int] = {}
    for part in parts:
        for name, value in (part.manifest.get("counts") or {}).items():
            if isinstance(value, int):
                counts[name] = counts.get(name, 0) + value
    return {"stage": "generate", "counts": counts, "shards": len(parts), "complete": True,
            "finished_at": max(part.manifest.get("finished_at") or "" for part in parts)}
