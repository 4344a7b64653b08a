"""Exact and near-duplicate filters for teacher reasoning traces, as streaming objects.

Both are fed items one at a time (or in batches) and answer "is this a duplicate of something already kept?";
their memory grows with the number of *kept* items only, so the curate stage can stream a million samples.
Near-duplicates: MinHash over word 5-gram shingles, banded LSH for candidates, then a check of the estimated
Jaccard similarity on the stored signature, so a verdict means "estimated Jaccard >= threshold".

Backend choice, measured on long CoT-like texts (2k-20k characters, mean ~11k, ~1,900 shingles each),
num_perm=128, on a shared 2-core CPU box (load ~3.5), both backends fed the same shingle hashes and the same LSH
(`.venv/bin/python benchmarks/dedup_throughput.py`, N=2,000, best of 3):
  rensa 0.5.0 R-MinHash (Rust)             ~8,400-10,200 docs/s end to end (shingling + signatures + LSH)
  datasketch 2.0.0 MinHash.bulk (numpy)    ~1,500-2,300 docs/s end to end            -> rensa ~4.4x faster
  stock pipelines, one Python string per shingle: datasketch (sha1 + MinHashLSH) ~630 docs/s,
  rensa RMinHashDeduplicator ~4,200 docs/s (and lower recall: 133 of 201 planted near-duplicates vs 190 here)
So rensa is the default; pin it (rensa==0.5.0: its 0.5 release changed the signature algorithm). datasketch
stays selectable (backend="datasketch"): it costs ~10 lines and is already a declared dependency. The backends
use different permutations, so their verdicts differ slightly: pick one per run. add_batch and add_if_new run
at about the same speed: shingling (numpy, per text) dominates.

Shingle hashes come from numpy over the UTF-8 bytes (a polynomial prefix hash gives each word's hash, words are
combined into 5-gram hashes with vectorised arithmetic): ~3x faster than one Python string per shingle.

Note on thresholds: one changed word breaks up to 5 shingles, so 5% of words changed *at random positions*
gives a shingle Jaccard of only ~0.63 and is NOT a near-duplicate at 0.8; the same 5% changed in a few
contiguous edits (a rephrased sentence, a different number carried through a line) gives ~0.9.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Hashable, Iterable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Exact duplicates


def normalize_for_exact(text: str) -> str:
    """Lowercase and collapse every run of whitespace to one space (trimmed at both ends).

    Punctuation is kept on purpose: in math traces it carries meaning ("2.5" vs "25", "x^2" vs "x 2"), and
    near-duplicates that differ only in punctuation are the near-dup filter's job.
    """
    return " ".join(text.lower().split())


class ExactDeduper:
    """Remembers a 16-byte blake2b digest of each kept text (about 80 bytes per kept item in a Python set)."""

    def __init__(self) -> None:
        self._digests: set[bytes] = set()

    @staticmethod
    def digest(text: str) -> bytes:
        return hashlib.blake2b(normalize_for_exact(text).encode("utf-8"), digest_size=16).digest()

    def seen(self, text: str) -> bool:
        """True if an equal text (after normalization) was kept before; otherwise keep this one and return False."""
        digest = self.digest(text)
        if digest in self._digests:
            return True
        self._digests.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._digests)


# ---------------------------------------------------------------------------------------------------------------
# Shingle hashing: text -> uint64 hashes of its word n-grams, deterministic across processes and platforms.

_UINT64 = np.uint64
_BYTE_BASE = _UINT64(0x100000001B3)  # odd, hence invertible modulo 2**64
_BYTE_BASE_INVERSE = _UINT64(pow(0x100000001B3, -1, 1 << 64))


def _odd_constants(seed: int, count: int) -> np.ndarray:
    """`count` odd 64-bit constants from SplitMix64: pure Python, so identical on every numpy version."""
    mask, state, out = (1 << 64) - 1, seed & ((1 << 64) - 1), []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        value = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
        out.append((value ^ (value >> 31)) | 1)
    return np.array(out, dtype=_UINT64)


_POSITION_MULTIPLIERS = _odd_constants(0x5EED, 32)  # one per word position inside a shingle
_IS_ASCII_SPACE = np.zeros(256, dtype=bool)
_IS_ASCII_SPACE[[9, 10, 11, 12, 13, 32]] = True
_powers = np.ones(1, dtype=_UINT64)  # _BYTE_BASE**i, grown on demand and shared by all calls
_inverse_powers = np.ones(1, dtype=_UINT64)


def _power_tables(length: int) -> tuple[np.ndarray, np.ndarray]:
    global _powers, _inverse_powers
    if len(_powers) < length:
        size = max(length, 2 * len(_powers))
        with np.errstate(over="ignore"):
            _powers = np.cumprod(np.full(size, _BYTE_BASE)) * _BYTE_BASE_INVERSE
            _inverse_powers = np.cumprod(np.full(size, _BYTE_BASE_INVERSE)) * _BYTE_BASE
    return _powers, _inverse_powers


def _mix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: spreads structured sums over all 64 bits (MinHash needs uniform hashes)."""
    values = values ^ (values >> _UINT64(33))
    values = values * _UINT64(0xFF51AFD7ED558CCD)
    values = values ^ (values >> _UINT64(33))
    values = values * _UINT64(0xC4CEB9FE1A85EC53)
    return values ^ (values >> _UINT64(33))


def word_hashes(text: str) -> np.ndarray:
    """Hash of every whitespace-separated word of the lowercased text, in order, without a Python loop."""
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    if data.size == 0:
        return np.zeros(0, dtype=_UINT64)
    space = _IS_ASCII_SPACE[data]
    starts = np.flatnonzero(~space & np.concatenate(([True], space[:-1])))
    ends = np.flatnonzero(~space & np.concatenate((space[1:], [True]))) + 1
    powers, inverse_powers = _power_tables(data.size)
    with np.errstate(over="ignore"):
        prefix = np.zeros(data.size + 1, dtype=_UINT64)
        np.cumsum(data * powers[: data.size], out=prefix[1:])
        # (prefix[end] - prefix[start]) / base**start: the word's hash, independent of where it sits
        return (prefix[ends] - prefix[starts]) * inverse_powers[starts]


def ngram_hashes(words: np.ndarray, size: int) -> np.ndarray:
    """uint64 hashes of the `size`-grams of a word_hashes() array; fewer words than that make one gram of all."""
    if not 1 <= size <= len(_POSITION_MULTIPLIERS):
        raise ValueError(f"n-grams must be 1..{len(_POSITION_MULTIPLIERS)} words, got {size}")
    count = max(len(words) - size + 1, 1)
    width = min(size, len(words))
    combined = np.zeros(count, dtype=_UINT64)
    with np.errstate(over="ignore"):
        for position in range(width):
            combined += words[position : position + count] * _POSITION_MULTIPLIERS[position]
        return _mix64(combined + _UINT64(width))


def shingle_hashes(text: str, shingle: int = 5) -> np.ndarray:
    """uint64 hashes of the text's word `shingle`-grams; a text shorter than that is one gram of all its words."""
    return ngram_hashes(word_hashes(text), shingle)


# ---------------------------------------------------------------------------------------------------------------
# MinHash signatures: a (documents, num_perm) uint32 matrix from per-document shingle hashes.


def _rensa_signatures(hash_arrays: Sequence[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    try:
        import rensa
    except ImportError as error:
        hint = "NearDupIndex's default backend needs `pip install rensa==0.5.0` (or pass backend='datasketch')"
        raise ImportError(hint) from error

    offsets = np.zeros(len(hash_arrays) + 1, dtype=_UINT64)
    np.cumsum([len(hashes) for hashes in hash_arrays], out=offsets[1:])
    flat = np.concatenate(hash_arrays) if hash_arrays else np.zeros(0, dtype=_UINT64)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, seed)
    return np.array(matrix.to_rows(), dtype=np.uint32).reshape(len(hash_arrays), num_perm)


def _datasketch_signatures(hash_arrays: Sequence[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    from datasketch import MinHash

    # datasketch's default scheme takes 32-bit token hashes; ours are already uniform, so no sha1 is needed
    low_bits = [(hashes & _UINT64(0xFFFFFFFF)).astype(np.uint32) for hashes in hash_arrays]
    sketches = MinHash.bulk(low_bits, num_perm=num_perm, seed=seed, hashfunc=lambda value: value)
    return np.array([sketch.hashvalues for sketch in sketches], dtype=np.uint32).reshape(len(hash_arrays), num_perm)


SIGNATURE_BACKENDS = {"rensa": _rensa_signatures, "datasketch": _datasketch_signatures}
DEFAULT_BACKEND = "rensa"


# ---------------------------------------------------------------------------------------------------------------
# Banded LSH index with verification


@functools.lru_cache(maxsize=None)
def _lsh_bands(threshold: float, num_perm: int, false_negative_weight: float = 0.95) -> tuple[int, int]:
    """(bands, rows) minimising weighted false-positive/false-negative area of the LSH S-curve.

    Weighted toward recall because every candidate is re-checked against the full signature, which removes the
    false positives; what banding misses is lost for good. At threshold 0.8 and 128 slots this gives 16 bands of
    8 rows: a pair at Jaccard 0.85 becomes a candidate 99.4% of the time (datasketch's even weights, 9x13: 69%).
    """
    grid = np.linspace(0.0, 1.0, 2001)
    below, above = grid <= threshold, grid >= threshold
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            candidate = 1.0 - (1.0 - grid**rows) ** bands
            false_positive = np.trapezoid(candidate[below], grid[below])
            false_negative = np.trapezoid(1.0 - candidate[above], grid[above])
            error = (1 - false_negative_weight) * false_positive + false_negative_weight * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


class _BandKeyStore:
    """Multimap from 64-bit band keys to kept-item indices, ~12 bytes per entry.

    A Python dict costs ~75 bytes per entry (int objects plus slots), about 1.2 kB per kept item at 16 bands.
    Here recent inserts sit in a small dict and are merged in bulk into two sorted numpy arrays (keys, items);
    merging a sorted batch is one O(n) np.insert, so the amortised cost stays low at millions of entries.
    Merges happen only between batches, so a whole batch is looked up in the sorted part with one searchsorted.
    """

    def __init__(self, merge_every: int = 1 << 19) -> None:
        self._merge_every = merge_every  # entries held in the dict before a merge (~40 MB of dict at most)
        self._recent: dict[int, int | tuple[int, ...]] = {}
        self._recent_count = 0
        self._keys = np.zeros(0, dtype=_UINT64)
        self._items = np.zeros(0, dtype=np.uint32)

    def __len__(self) -> int:
        return len(self._keys) + self._recent_count

    def lookup_merged(self, band_keys: np.ndarray) -> list[list[int]]:
        """For each row of (documents, bands) keys, the items found in the merged (sorted) part."""
        found: list[list[int]] = [[] for _ in range(len(band_keys))]
        if len(self._keys) == 0:
            return found
        flat = band_keys.ravel()
        order = np.argsort(flat)  # sorted queries walk the big array in order: ~2x fewer cache misses
        positions = np.empty_like(order)
        positions[order] = np.searchsorted(self._keys, flat[order])
        clipped = np.minimum(positions, len(self._keys) - 1)
        for hit in np.flatnonzero(self._keys[clipped] == flat).tolist():
            position, key = int(positions[hit]), self._keys[positions[hit]]
            while position < len(self._keys) and self._keys[position] == key:  # equal keys are adjacent
                found[hit // band_keys.shape[1]].append(int(self._items[position]))
                position += 1
        return found

    def lookup_recent(self, band_keys: np.ndarray) -> list[int]:
        found: list[int] = []
        for band_key in band_keys.tolist():
            entry = self._recent.get(band_key)
            if entry is not None:
                found.extend(_as_tuple(entry))
        return found

    def add(self, band_keys: np.ndarray, item: int) -> None:
        for band_key in band_keys.tolist():
            entry = self._recent.setdefault(band_key, item)
            if entry is not item:  # two kept items share a band key, not being near-duplicates: keep both
                self._recent[band_key] = _as_tuple(entry) + (item,)
        self._recent_count += len(band_keys)

    def merge_if_large(self) -> None:
        if self._recent_count >= self._merge_every:
            self.merge()

    def merge(self) -> None:
        """Move the recent entries into the sorted arrays (peak memory: twice the arrays, while copying)."""
        pairs = [(key, item) for key, entry in self._recent.items() for item in _as_tuple(entry)]
        new_keys = np.array([key for key, _ in pairs], dtype=_UINT64)
        new_items = np.array([item for _, item in pairs], dtype=np.uint32)
        order = np.argsort(new_keys, kind="stable")
        positions = np.searchsorted(self._keys, new_keys[order])
        self._keys = np.insert(self._keys, positions, new_keys[order])
        self._items = np.insert(self._items, positions, new_items[order])
        self._recent, self._recent_count = {}, 0


def _as_tuple(entry: int | tuple[int, ...]) -> tuple[int, ...]:
    return entry if isinstance(entry, tuple) else (entry,)


class NearDupIndex:
    """Streaming near-duplicate filter: MinHash LSH over word shingles, first-kept-wins.

    Memory per kept item at the defaults (16 bands, 128 slots): 16 band keys at ~12 bytes, the low 16 bits of
    each signature slot for the Jaccard check (256 bytes) and a reference to the caller's key: ~0.5 kB, about
    0.5 GB per million kept items (measured with tracemalloc, excluding the keys themselves).
    """

    _CHUNK_ROWS = 1 << 14  # signatures are stored in fixed chunks, so growing never copies the whole store

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle: int = 5,
        seed: int = 1,
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if backend not in SIGNATURE_BACKENDS:
            raise ValueError(f"backend must be one of {sorted(SIGNATURE_BACKENDS)}, got {backend!r}")
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        self.backend = backend
        self._signatures_of = SIGNATURE_BACKENDS[backend]
        self.bands, self.rows = _lsh_bands(threshold, num_perm)
        self._band_mixers = _odd_constants(seed, self.bands * self.rows).reshape(self.bands, self.rows)
        self._band_store = _BandKeyStore()
        self._keys: list[Hashable] = []
        self._signature_chunks: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._keys)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures (len(texts), num_perm) as uint32, computed in one backend call."""
        return self._signatures_of([shingle_hashes(text, self.shingle) for text in texts], self.num_perm, self.seed)

    def add_if_new(self, key: Hashable, text: str) -> Hashable | None:
        """The key of an already kept near-duplicate of `text`, or None after keeping `text` under `key`."""
        return self.add_batch([(key, text)])[0]

    def add_batch(self, items: Iterable[tuple[Hashable, str]]) -> list[Hashable | None]:
        """add_if_new for each item in order (duplicates inside the batch count too), signatures in bulk."""
        items = list(items)
        signatures = self.signatures([text for _, text in items])
        band_keys = self._band_keys(signatures)
        merged_candidates = self._band_store.lookup_merged(band_keys)
        verdicts = [
            self._add_signature(key, signature, keys_of_bands, merged)
            for (key, _), signature, keys_of_bands, merged in zip(items, signatures, band_keys, merged_candidates)
        ]
        self._band_store.merge_if_large()
        return verdicts

    def _band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(documents, bands) 64-bit keys: each band's rows folded with odd multipliers, then mixed with the band."""
        used = signatures[:, : self.bands * self.rows].astype(_UINT64).reshape(len(signatures), self.bands, self.rows)
        with np.errstate(over="ignore"):
            folded = (used * self._band_mixers).sum(axis=2, dtype=_UINT64)
            return _mix64(folded + np.arange(self.bands, dtype=_UINT64) * _UINT64(0x9E3779B97F4A7C15))

    def _add_signature(
        self, key: Hashable, signature: np.ndarray, band_keys: np.ndarray, merged_candidates: list[int]
    ) -> Hashable | None:
        candidates = sorted(set(merged_candidates).union(self._band_store.lookup_recent(band_keys)))
        match = self._verified_match(signature, candidates)
        if match is not None:
            return self._keys[match]
        self._insert(key, signature, band_keys)
        return None

    def _verified_match(self, signature: np.ndarray, candidates: list[int]) -> int | None:
        """The first (earliest kept) candidate whose estimated Jaccard reaches the threshold."""
        if not candidates:
            return None
        stored = np.stack([self._stored_signature(index) for index in candidates])
        similarity = (stored == signature.astype(np.uint16)).mean(axis=1)
        passing = np.flatnonzero(similarity >= self.threshold)
        return candidates[passing[0]] if passing.size else None

    def _stored_signature(self, index: int) -> np.ndarray:
        return self._signature_chunks[index // self._CHUNK_ROWS][index % self._CHUNK_ROWS]

    def _insert(self, key: Hashable, signature: np.ndarray, band_keys: np.ndarray) -> None:
        index = len(self._keys)
        if index % self._CHUNK_ROWS == 0:
            self._signature_chunks.append(np.empty((self._CHUNK_ROWS, self.num_perm), dtype=np.uint16))
        # 16 low bits per slot: unequal slots collide with probability 2**-16, a negligible bias on the estimate
        self._signature_chunks[-1][index % self._CHUNK_ROWS] = signature.astype(np.uint16)
        self._keys.append(key)
        self._band_store.add(band_keys, index)
