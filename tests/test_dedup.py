import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cot_distill.dedup import ExactDeduper, NearDupIndex, _BandKeyStore, normalize_for_exact, shingle_hashes

BACKENDS = ["rensa", "datasketch"]
REPO_ROOT = Path(__file__).resolve().parent.parent
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _vocabulary(rng: random.Random, size: int = 3000) -> list[str]:
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9))) for _ in range(size)]


def cot_trace(seed: int, words: int = 1800) -> str:
    """A long reasoning-trace-like text (~10k characters): words, numbers and equations."""
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng)
    out = []
    while len(out) < words:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        out += [rng.choice(vocabulary) for _ in range(rng.randint(4, 12))] + [f"{a}", "*", f"{b}", "=", f"{a * b}."]
    return " ".join(out[:words])


def rewrite_spans(text: str, seed: int, fraction: float, spans: int) -> str:
    """Replace `fraction` of the words, in `spans` contiguous runs, with fresh words."""
    rng = random.Random(seed)
    words = text.split()
    span = max(1, round(len(words) * fraction / spans))
    starts = rng.sample(range(0, len(words) - span, span), spans)  # step=span keeps the runs disjoint
    for start in starts:
        words[start : start + span] = [f"new{rng.randint(0, 10**6)}" for _ in range(span)]
    return " ".join(words)


def exact_jaccard(a: str, b: str) -> float:
    first, second = set(shingle_hashes(a).tolist()), set(shingle_hashes(b).tolist())
    return len(first & second) / len(first | second)


def corpus_with_near_duplicates() -> list[tuple[str, str]]:
    originals = [cot_trace(seed, words=600 + 80 * seed) for seed in range(12)]
    copies = [rewrite_spans(originals[i], seed=100 + i, fraction=0.03, spans=2) for i in range(0, 12, 2)]
    texts = originals[:6] + copies + originals[6:] + [originals[3].upper()]
    return [(f"k{i}", text) for i, text in enumerate(texts)]


# ----------------------------------------------------------------------------------------------- exact


def test_normalize_for_exact_collapses_case_and_whitespace_but_keeps_punctuation():
    assert normalize_for_exact("  So  X\n\t= 2.5 \n") == "so x = 2.5"
    assert normalize_for_exact("x = 2.5") != normalize_for_exact("x = 25")


def test_exact_duplicate_detected_regardless_of_whitespace_and_case():
    deduper = ExactDeduper()
    assert deduper.seen("Let me think.\nThe answer is 42.") is False
    assert deduper.seen("  let ME   think. the answer\tis 42.  ") is True
    assert deduper.seen("Let me think. The answer is 43.") is False
    assert len(deduper) == 2


def test_exact_deduper_stores_compact_digests():
    deduper = ExactDeduper()
    deduper.seen("x" * 30_000)
    assert all(len(digest) == 16 for digest in deduper._digests)


# ----------------------------------------------------------------------------------------------- shingles


def test_shingle_hashes_ignore_case_and_whitespace_and_handle_short_texts():
    assert np.array_equal(shingle_hashes("A b  c\nd e f"), shingle_hashes("a B c d E f"))
    assert len(shingle_hashes("a b c d e f")) == 2
    assert len(shingle_hashes("one two")) == 1  # shorter than a shingle: the whole text is one gram
    assert shingle_hashes("one two")[0] != shingle_hashes("one three")[0]
    assert len(shingle_hashes("")) == 1


def test_shingle_order_matters():
    assert set(shingle_hashes("a b c d e").tolist()) != set(shingle_hashes("e d c b a").tolist())


# ----------------------------------------------------------------------------------------------- near-dup


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_duplicate_flagged_and_unrelated_trace_not(backend):
    original = cot_trace(seed=1)
    assert len(original) > 8000
    edited = rewrite_spans(original, seed=2, fraction=0.05, spans=3)
    assert 0.85 < exact_jaccard(original, edited) < 0.95
    index = NearDupIndex(threshold=0.8, backend=backend)
    assert index.add_if_new("original", original) is None
    assert index.add_if_new("edited", edited) == "original"
    assert index.add_if_new("unrelated", cot_trace(seed=3)) is None
    assert len(index) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_verdict_follows_exact_jaccard_away_from_threshold(backend):
    original = cot_trace(seed=4)
    # scattered edits break many more shingles than clustered ones: 5% of words at random positions
    # leaves a Jaccard of only ~0.6, which must not pass a 0.8 threshold
    variants = {
        "light": rewrite_spans(original, seed=5, fraction=0.02, spans=2),
        "clustered": rewrite_spans(original, seed=6, fraction=0.05, spans=4),
        "scattered": rewrite_spans(original, seed=7, fraction=0.05, spans=90),
        "heavy": rewrite_spans(original, seed=8, fraction=0.2, spans=5),
    }
    for name, variant in variants.items():
        index = NearDupIndex(backend=backend)
        index.add_if_new("original", original)
        similarity = exact_jaccard(original, variant)
        assert abs(similarity - 0.8) > 0.05, (name, similarity)  # the test variants stay clear of the edge
        expected = "original" if similarity >= 0.8 else None
        assert index.add_if_new(name, variant) == expected, (name, similarity)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_kept_match_wins_when_several_kept_items_match(backend):
    words = cot_trace(seed=11).split()
    span = len(words) * 16 // 100

    def rewrite(start: int, tag: str) -> str:
        return " ".join(words[:start] + [f"{tag}{i}" for i in range(span)] + words[start + span :])

    left, right = rewrite(100, "left"), rewrite(1000, "right")
    assert exact_jaccard(left, right) < 0.55 and exact_jaccard(left, " ".join(words)) > 0.7
    index = NearDupIndex(threshold=0.6, num_perm=256, backend=backend)  # 256 slots: margins of >3 std. devs
    assert index.add_batch([("left", left), ("right", right)]) == [None, None]
    assert index.add_if_new("original", " ".join(words)) == "left"  # similar to both: the earlier kept wins


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_and_single_apis_agree_including_duplicates_inside_one_batch(backend):
    items = corpus_with_near_duplicates()
    single = NearDupIndex(backend=backend)
    one_by_one = [single.add_if_new(key, text) for key, text in items]
    batched = NearDupIndex(backend=backend)
    in_batches = batched.add_batch(items[:5]) + batched.add_batch(items[5:])
    assert in_batches == one_by_one
    flagged = {key: verdict for (key, _), verdict in zip(items, one_by_one) if verdict is not None}
    # edited copies point at their originals; originals arriving after their copy point at the copy;
    # the upper-cased original is an exact shingle match
    assert flagged == {"k6": "k0", "k7": "k2", "k8": "k4", "k12": "k9", "k14": "k10", "k16": "k11", "k18": "k3"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_verdicts(backend):
    items = corpus_with_near_duplicates()
    first = NearDupIndex(seed=7, backend=backend).add_batch(items)
    second = NearDupIndex(seed=7, backend=backend).add_batch(items)
    assert first == second
    assert sum(verdict is not None for verdict in first) == 7


def test_tiny_internal_buffers_give_the_same_verdicts():
    """Merges into the sorted band arrays and new signature chunks must not change any verdict."""
    items = corpus_with_near_duplicates()
    expected = NearDupIndex().add_batch(items)
    tiny = NearDupIndex()
    tiny._band_store = _BandKeyStore(merge_every=1)  # merge after every batch
    tiny._CHUNK_ROWS = 2
    assert [tiny.add_if_new(key, text) for key, text in items] == expected
    assert len(tiny._band_store._recent) == 0 and len(tiny._band_store._keys) == len(tiny) * tiny.bands


def test_band_store_keeps_every_item_that_shares_a_key():
    store = _BandKeyStore()
    store.add(np.array([5, 7], dtype=np.uint64), 0)
    store.add(np.array([5, 8], dtype=np.uint64), 1)
    assert sorted(store.lookup_recent(np.array([5, 9], dtype=np.uint64))) == [0, 1]
    store.merge()
    store.add(np.array([5, 9], dtype=np.uint64), 2)
    queries = np.array([[5, 1], [8, 2], [3, 4]], dtype=np.uint64)
    assert [sorted(found) for found in store.lookup_merged(queries)] == [[0, 1], [1], []]
    assert store.lookup_recent(np.array([9], dtype=np.uint64)) == [2]
    assert len(store) == 6


def test_signatures_identical_across_processes_with_different_hash_seeds():
    """Verdicts must not depend on Python's per-process string hash randomization."""
    text = cot_trace(seed=9, words=300)
    script = (
        "import sys; from cot_distill.dedup import NearDupIndex; "
        "print(NearDupIndex(seed=3).signatures([sys.stdin.read()])[0].tolist())"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        run = subprocess.run(
            [sys.executable, "-c", script], input=text, capture_output=True, text=True, env=env, cwd=REPO_ROOT
        )
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert outputs[0] == outputs[1]
    assert outputs[0].strip() == str(NearDupIndex(seed=3).signatures([text])[0].tolist())


def test_rejects_unknown_backend_and_bad_threshold():
    with pytest.raises(ValueError):
        NearDupIndex(backend="faiss")
    with pytest.raises(ValueError):
        NearDupIndex(threshold=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_texts(backend):
    index = NearDupIndex(backend=backend)
    assert index.add_batch([]) == []
    verdicts = index.add_batch([("blank", ""), ("spaces", " \n "), ("word", "x"), ("upper", "X")])
    assert verdicts == [None, "blank", None, "word"]
