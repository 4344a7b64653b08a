"""Build the CPU demo's arithmetic problem set: a train split and a disjoint held-out split.

The files are committed (data/demo/arithmetic-{train,test}.jsonl); this script documents and reproduces them:
    python scripts/build_demo_problems.py
Why arithmetic and not the word problems in data/demo/prompts.jsonl: SmolLM2-135M-Instruct verified 13 of 240
traces there (0.05), too little signal to distill; on these facts it is right about a quarter of the time (see
README, "The CPU demo"). The splits share no (a, b) pair under any operation: a student cannot pass the held-out
split by remembering a training problem, and decontamination (which drops the operator symbols when it normalizes
text, so "7 + 5" and "7 * 5" read alike) finds nothing to remove.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
SEED = 0
HELD_OUT_DIGIT_PAIRS = 25  # each held out under +, - and *: 75 single-digit test problems
HELD_OUT_TWO_DIGIT = 25
TWO_DIGIT_ADDITIONS = 200  # sampled from the 8,100 two-digit pairs
# Two-digit additions kept for training: none. The teacher verifies ~5% of its traces on them (held-out pass@1 0.00),
# so they cost generation time for almost no rows; that time buys 6 samples per single-digit problem instead of 4
# (175 kept until 2026-12-01, then 50, then 0). The held-out split is unchanged: still 25 of each kind.
TWO_DIGIT_TRAIN = 0


def problem(kind: str, a: int, b: int) -> dict:
    symbol, value = {"add": ("+", a + b), "add2": ("+", a + b), "sub": ("-", a - b), "mul": ("*", a * b)}[kind]
    return {"id": f"{kind}-{a}-{b}", "problem": f"What is {a} {symbol} {b}?", "answer": str(value), "kind": kind}


def split() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    digits = range(10)
    two_digit = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], TWO_DIGIT_ADDITIONS)
    held_out = set(rng.sample([(a, b) for a in digits for b in digits if a >= b], HELD_OUT_DIGIT_PAIRS))
    held_out |= set(two_digit[:HELD_OUT_TWO_DIGIT])
    problems = ([problem("add", a, b) for a in digits for b in digits]
                + [problem("sub", a, b) for a in digits for b in digits if a >= b]
                + [problem("mul", a, b) for a in digits for b in digits]
                + [problem("add2", a, b) for a, b in two_digit])
    train = [row for row in problems if pair(row) not in held_out]
    test = [row for row in problems if pair(row) in held_out]
    rng.shuffle(train)
    rng.shuffle(test)
    # Dropped after both shuffles, so the random draws (and the held-out file) stay exactly as before.
    kept_two_digit = set(two_digit[HELD_OUT_TWO_DIGIT:HELD_OUT_TWO_DIGIT + TWO_DIGIT_TRAIN])
    train = [row for row in train if row["kind"] != "add2" or pair(row) in kept_two_digit]
    return train, test


def pair(row: dict) -> tuple[int, int]:
    _, a, b = row["id"].split("-")
    return int(a), int(b)


def main() -> None:
    train, test = split()
    for name, rows in (("arithmetic-train.jsonl", train), ("arithmetic-test.jsonl", test)):
        with open(OUT_DIR / name, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{OUT_DIR / name}: {len(rows)} problems")


if __name__ == "__main__":
    main()
