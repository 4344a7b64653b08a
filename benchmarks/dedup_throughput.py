"""Near-duplicate throughput on long CoT-like texts: rensa vs datasketch, same texts, same run.

    .venv/bin/python benchmarks/dedup_throughput.py [--n 2000] [--repeats 3] [--batch 256] [--no-stock]

Times NearDupIndex.add_batch (shingling + MinHash signatures + LSH query/insert with Jaccard check) for each
signature backend on the same synthetic corpus (2k-20k characters per text, ~10% planted near-duplicates made by
rewriting a few contiguous spans, ~5% of the words). Also times each library's "stock" pipeline (one Python
string per shingle, the library's own hashing and LSH) for reference. Best of --repeats per pipeline.
Last line: RESULT near_dup_docs_per_s=<x> backend=<default backend> ratio_vs_other=<default / other backend>.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cot_distill.dedup import DEFAULT_BACKEND, SIGNATURE_BACKENDS, NearDupIndex  # noqa: E402

PHRASES = [
    "so we need to find", "let me check this again", "wait, that is not right", "hmm, maybe I should",
    "multiply both sides by", "divide both sides by", "substituting back gives", "therefore the answer is",
    "let us verify:", "which means that", "so the total is", "first, note that", "alternatively, consider",
    "this simplifies to", "plugging in the values", "the remainder is", "since the sum equals",
]


def _words(rng: random.Random, vocabulary: list[str], count: int) -> list[str]:
    return [rng.choice(vocabulary) for _ in range(count)]


def cot_like_text(rng: random.Random, vocabulary: list[str], target_chars: int) -> str:
    """Reasoning-trace-shaped filler: stock phrases, equations with numbers, and topic words."""
    sentences, size = [], 0
    while size < target_chars:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        topic = " ".join(_words(rng, vocabulary, rng.randint(3, 12)))
        sentence = f"{rng.choice(PHRASES)} {topic}, {a} * {b} = {a * b}."
        sentences.append(sentence.capitalize())
        size += len(sentence) + 1
    return " ".join(sentences) + f"\n\nThe answer is \\boxed{{{rng.randint(0, 9999)}}}."


def near_duplicate(rng: random.Random, vocabulary: list[str], text: str, changed_fraction: float = 0.05) -> str:
    """Rewrite ~changed_fraction of the words in 3 contiguous spans (how regenerated traces tend to differ)."""
    words = text.split()
    span = max(1, int(len(words) * changed_fraction / 3))
    for start in rng.sample(range(max(1, len(words) - span)), 3):
        words[start : start + span] = _words(rng, vocabulary, span)
    return " ".join(words)


def make_corpus(n: int, seed: int = 0, near_dup_rate: float = 0.1) -> tuple[list[str], int]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(5000)]
    texts, planted = [], 0
    for _ in range(n):
        if texts and rng.random() < near_dup_rate:
            texts.append(near_duplicate(rng, vocabulary, rng.choice(texts)))
            planted += 1
        else:
            texts.append(cot_like_text(rng, vocabulary, rng.randint(2000, 20000)))
    return texts, planted


def time_index(texts: list[str], backend: str, batch: int) -> tuple[float, int]:
    index = NearDupIndex(backend=backend)
    start = time.perf_counter()
    flagged = 0
    for offset in range(0, len(texts), batch):
        verdicts = index.add_batch((str(offset + i), text) for i, text in enumerate(texts[offset : offset + batch]))
        flagged += sum(verdict is not None for verdict in verdicts)
    return time.perf_counter() - start, flagged


def _shingle_strings(text: str, size: int = 5) -> list[str]:
    words = text.lower().split()
    return list(map(" ".join, zip(*(words[i:] for i in range(size))))) or [" ".join(words)]


def time_stock_datasketch(texts: list[str]) -> tuple[float, int]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh, kept, flagged = MinHashLSH(threshold=0.8, num_perm=128), {}, 0
    sketches = MinHash.bulk([[s.encode() for s in _shingle_strings(t)] for t in texts], num_perm=128, seed=1)
    for i, sketch in enumerate(sketches):
        if any(sketch.jaccard(kept[key]) >= 0.8 for key in lsh.query(sketch)):
            flagged += 1
        else:
            lsh.insert(i, sketch)
            kept[i] = sketch
    return time.perf_counter() - start, flagged


def time_stock_rensa(texts: list[str]) -> tuple[float, int]:
    from rensa import RMinHashDeduplicator

    start = time.perf_counter()
    deduplicator = RMinHashDeduplicator(0.8, 128, True, None, 1)
    kept = deduplicator.add_pairs((str(i), _shingle_strings(t)) for i, t in enumerate(texts))
    return time.perf_counter() - start, sum(not k for k in kept)


def best_of(repeats: int, run) -> tuple[float, int]:
    results = [run() for _ in range(repeats)]
    return min(seconds for seconds, _ in results), results[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-stock", action="store_true", help="skip the libraries' stock pipelines")
    args = parser.parse_args()

    texts, planted = make_corpus(args.n)
    mean_chars = sum(map(len, texts)) / len(texts)
    print(f"corpus: {len(texts)} texts, mean {mean_chars:.0f} chars, {planted} planted near-duplicates")
    docs_per_s = {}
    for backend in SIGNATURE_BACKENDS:
        seconds, flagged = best_of(args.repeats, lambda: time_index(texts, backend, args.batch))
        docs_per_s[backend] = len(texts) / seconds
        print(f"NearDupIndex backend={backend:<10} {docs_per_s[backend]:8.0f} docs/s  flagged {flagged}")
    if not args.no_stock:
        for name, run in [("datasketch", time_stock_datasketch), ("rensa", time_stock_rensa)]:
            seconds, flagged = best_of(args.repeats, lambda: run(texts))
            print(f"stock {name:<10} (string shingles) {len(texts) / seconds:8.0f} docs/s  flagged {flagged}")
    other = next(name for name in docs_per_s if name != DEFAULT_BACKEND)
    ratio = docs_per_s[DEFAULT_BACKEND] / docs_per_s[other]
    print(f"{DEFAULT_BACKEND} / {other}: {ratio:.2f}x")
    best = docs_per_s[DEFAULT_BACKEND]
    print(f"RESULT near_dup_docs_per_s={best:.0f} backend={DEFAULT_BACKEND} ratio_vs_other={ratio:.2f}")


if __name__ == "__main__":
    main()
