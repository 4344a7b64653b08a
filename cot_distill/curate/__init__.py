"""The curate stage: the teacher's samples -> a filtered, deduplicated, decontaminated training set.

run_curate(recipe) is linear: check the generate output -> load prompts -> log the resolved config -> stream
samples.jsonl in batches through the filters -> select per prompt -> write train.jsonl, the HF dataset, the
report, card and histogram -> manifest.json last. Filters run in this order, each counting what it drops and why:

  input          samples of prompts not in the recipe's data, or made with another teacher, prompt template or
                 sampling parameters (generate's ledger keeps those across recipe edits); with `teachers:`, each
                 teacher's samples against that teacher's model, name and own sampling
  completeness   finish_reason "stop", the reasoning block closed, some answer text after it
  repetition     degenerate loops in the tail (see RepetitionFilter in config/curate.py)
  length         completion tokens <= max_tokens (a named tokenizer, else usage.completion_tokens)
  correctness    cot_distill.grading on the answer text (after the reasoning) vs the gold answer; True kept
  exact_dedup    normalized identical completions, per prompt (or global)
  near_dup       MinHash estimated Jaccard >= threshold, per prompt (or global)
  decontaminate  the prompt's problem shares a word 8-gram with a benchmark problem: all its samples go
  select         per prompt: all, the k shortest, or k seeded-random; with `teachers:`, of the teacher
                 select.across_teachers picks (or of all of them pooled)

Speed: the work that needs only a text (word hashes, loop check, exact digest, MinHash signature) and a prompt's
decontamination run in worker processes a batch ahead of the main process, which reads, grades and writes.
Results do not depend on the number of workers. Output order is samples.jsonl order; dedup keeps the first seen.

Memory follows the kept samples, not the corpus: a batch at a time is in flight; what stays is the prompts, a
16-byte digest and a num_perm x 16-bit MinHash signature per kept sample (per prompt scope: compared pairwise
within the prompt, since a prompt has a handful of samples and LSH banding would only lose recall; the global scope
uses NearDupIndex's LSH), the ids of contaminated prompts and, for shortest/random, the k best (rank, position)
pairs per prompt (per prompt and teacher when choosing across teachers, every survivor's when k is unset); with
`teachers:`, each (prompt, teacher)'s extracted answers, for teacher_agreement. Survivors go straight to
train.jsonl, or when selecting to a spool the selected are copied from.

Submodules (one concern each; this package re-exports what other modules import):

  cot_distill.curate.features  Candidate and the per-text features computed in worker processes (loop coverage,
                               exact digest, MinHash signature, decontamination): FeatureService
  cot_distill.curate.filters   the Filter protocol, the *Check filters in the order above, build_filters,
                               apply_filters, build_decontaminator, CurateError
  cot_distill.curate.rows      per-prompt selection (Selector) and the training rows written to train.jsonl
  cot_distill.curate.report    tallies, report.json, the console table, dataset card, histogram, the Arrow dataset
  cot_distill.curate.run       the streaming stage: run_curate, the uniform stage entry run(), the output file names

Note: the package attribute `run` is the stage entry function, which shadows the submodule of the same name as an
attribute; import from the module with `from cot_distill.curate.run import ...` (that resolves the module).
"""

from cot_distill.curate.features import repetition_coverage
from cot_distill.curate.filters import CurateError
from cot_distill.curate.run import (
    CARD_FILE,
    DATASET_DIR,
    HISTOGRAM_FILE,
    REPORT_FILE,
    SPOOL_FILE,
    TRAIN_FILE,
    run,
    run_curate,
)

__all__ = ["CARD_FILE", "DATASET_DIR", "HISTOGRAM_FILE", "REPORT_FILE", "SPOOL_FILE", "TRAIN_FILE", "CurateError",
           "repetition_coverage", "run", "run_curate"]
