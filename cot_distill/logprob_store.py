"""The teacher's recorded top-K log-probabilities: one append-only binary file next to the ledger (logprobs.bin),
written by generate (generate.logprobs: K) and read by training (kd.teacher: recorded).

One record per sample, little-endian:

    header  32 bytes: magic b"CDLP", version u8, reserved u8, k u16, n u32 (completion tokens),
                      request key (16 bytes, ledger.compact_key form), crc32 u32 of the payload
    payload token_ids int32[n]              the completion's tokens, as the teacher sampled them
            topk_ids int32[n, k]            per position, the ids vLLM returned as top_logprobs (-1: padding)
            topk_logprobs float16[n, k]     their log-probabilities (-inf: padding)

4 + 6k bytes a token: a 16k-token trace at K=20 takes 2.0 MB, a tenth of the same numbers as JSON text. float16
keeps a log-probability to ~5e-4 relative (0.005 at -10, a 0.5% error in a probability of 5e-5), below what
changes a KL term. The sample's ledger row links its record ({file, offset, bytes, tokens, k}), so a record
without a row (killed between the two writes) is never read, and a resent request appends a new one.

Durability as for the ledger (records.py): each record is one write(), flushed before its ledger row is written;
a torn record at the end (killed mid-write) is cut off when the file is reopened; a reader checks the magic, the
key and the checksum at the linked offset, so a row can never be paired with another sample's numbers.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cot_distill.errors import UserError
from cot_distill.records import DurableAppender

LOGPROBS_FILE = "logprobs.bin"
MAGIC, VERSION = b"CDLP", 1
HEADER = struct.Struct("<4sBBHI16sI")
ID_DTYPE, LOGPROB_DTYPE = np.dtype("<i4"), np.dtype("<f2")


class LogprobStoreError(UserError, ValueError):
    """A recorded-logprobs link that does not lead to its record: the message names the file and offset."""


@dataclass
class TokenLogprobs:
    """A completion's tokens and, per token, the teacher's top-K ids and log-probabilities (temperature 1)."""

    token_ids: np.ndarray  # (n,) int32
    topk_ids: np.ndarray  # (n, k) int32, -1 where padded
    topk_logprobs: np.ndarray  # (n, k) float32 in memory (float16 on disk), -inf where padded

    @classmethod
    def from_lists(cls, token_ids: list[int], topk: list[list[tuple[int, float]]], k: int) -> "TokenLogprobs":
        """From per-position (id, logprob) lists of up to k entries each; shorter lists are padded."""
        ids = np.full((len(token_ids), k), -1, dtype=ID_DTYPE)
        logprobs = np.full((len(token_ids), k), -np.inf, dtype=np.float32)
        for position, entries in enumerate(topk):
            for column, (token, logprob) in enumerate(entries[:k]):
                ids[position, column], logprobs[position, column] = token, logprob
        return cls(np.asarray(token_ids, dtype=ID_DTYPE), ids, logprobs)

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def payload(self) -> bytes:
        return b"".join((self.token_ids.astype(ID_DTYPE).tobytes(), self.topk_ids.astype(ID_DTYPE).tobytes(),
                         self.topk_logprobs.astype(LOGPROB_DTYPE).tobytes()))


def payload_bytes(n: int, k: int) -> int:
    return n * ID_DTYPE.itemsize + n * k * (ID_DTYPE.itemsize + LOGPROB_DTYPE.itemsize)


def key_bytes(request_key: str) -> bytes:
    return bytes.fromhex(request_key[:32])  # the ledger's compact key (generate.ledger.compact_key)


class LogprobWriter(DurableAppender):
    """Appends records to logprobs.bin. Reopening cuts a torn last record off; fsync every `fsync_every`."""

    def __init__(self, path: str | Path, fsync_every: int = 64):
        super().__init__(path, repair_torn_tail, binary=True, fsync_every=fsync_every)

    def append(self, request_key: str, record: TokenLogprobs) -> dict[str, Any]:
        """Write one record (a single write, flushed) and return its link for the ledger row."""
        payload = record.payload()
        header = HEADER.pack(MAGIC, VERSION, 0, record.k, len(record.token_ids), key_bytes(request_key),
                             zlib.crc32(payload))
        offset = self._handle.tell()
        self._handle.write(header + payload)
        self._handle.flush()  # in the OS before the ledger row that points here is written: kill -9 safe
        self._written()
        return {"file": str(self.path), "offset": offset, "bytes": HEADER.size + len(payload),
                "tokens": len(record.token_ids), "k": record.k}


def iter_headers(path: str | Path) -> Iterator[tuple[int, int, int, bytes]]:
    """(offset, n, k, key) of each complete record, in file order, reading headers only (a seek per record); stops
    at the first record that is torn or not a record."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        offset = 0
        while offset + HEADER.size <= size:
            handle.seek(offset)
            magic, version, _, k, n, key, _ = HEADER.unpack(handle.read(HEADER.size))
            end = offset + HEADER.size + payload_bytes(n, k)
            if magic != MAGIC or version != VERSION or end > size:
                return
            yield offset, n, k, key
            offset = end


def repair_torn_tail(path: str | Path) -> int:
    """Cut the file after its last complete record; returns the bytes removed (0 when intact or absent)."""
    path = Path(path)
    if not path.exists():
        return 0
    size, end = path.stat().st_size, 0
    for offset, n, k, _ in iter_headers(path):
        end = offset + HEADER.size + payload_bytes(n, k)
    if end < size:
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return size - end


def _read_header(handle, link: dict[str, Any], request_key: str | None) -> tuple[int, int, int]:
    where = f"{link.get('file')} at offset {link.get('offset')}"
    handle.seek(int(link["offset"]))
    raw = handle.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise LogprobStoreError(f"{where}: the file ends before the record (was it truncated or replaced?)")
    magic, version, _, k, n, key, crc = HEADER.unpack(raw)
    if magic != MAGIC or version != VERSION:
        raise LogprobStoreError(f"{where}: no logprobs record starts there (the file was rewritten?)")
    if request_key is not None and key != key_bytes(request_key):
        raise LogprobStoreError(f"{where}: the record there belongs to another request than {request_key[:16]}...")
    return n, k, crc


def read_logprobs(link: dict[str, Any], request_key: str | None = None) -> TokenLogprobs:
    """The record a ledger or dataset row links to, checked (magic, key when given, crc32)."""
    try:
        with open(link["file"], "rb") as handle:
            n, k, crc = _read_header(handle, link, request_key)
            payload = handle.read(payload_bytes(n, k))
    except OSError as exc:
        raise LogprobStoreError(f"cannot read recorded logprobs {link.get('file')}: {exc.strerror}") from None
    if len(payload) != payload_bytes(n, k) or zlib.crc32(payload) != crc:
        raise LogprobStoreError(f"{link['file']} at offset {link['offset']}: the record is damaged (checksum)")
    ids_end = n * ID_DTYPE.itemsize
    topk_end = ids_end + n * k * ID_DTYPE.itemsize
    return TokenLogprobs(np.frombuffer(payload[:ids_end], dtype=ID_DTYPE),
                         np.frombuffer(payload[ids_end:topk_end], dtype=ID_DTYPE).reshape(n, k),
                         np.frombuffer(payload[topk_end:], dtype=LOGPROB_DTYPE).reshape(n, k).astype(np.float32))


def read_token_ids(link: dict[str, Any], request_key: str | None = None) -> np.ndarray:
    """Only the completion's token ids of a record (what the tokenization check needs): n * 4 bytes read."""
    try:
        with open(link["file"], "rb") as handle:
            n, _, _ = _read_header(handle, link, request_key)
            raw = handle.read(n * ID_DTYPE.itemsize)
    except OSError as exc:
        raise LogprobStoreError(f"cannot read recorded logprobs {link.get('file')}: {exc.strerror}") from None
    if len(raw) != n * ID_DTYPE.itemsize:  # the checksum covers more than is read here: check the length at least
        raise LogprobStoreError(f"{link['file']} at offset {link['offset']}: the file ends inside the record "
                                f"(was it truncated or copied in part?)")
    return np.frombuffer(raw, dtype=ID_DTYPE)
