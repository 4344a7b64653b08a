"""The eval stage: benchmark a model (pass@k, maj@K, tokens, latency, memory) and compare eval folders.

    run        the stage: run(recipe, slot=...) and run_eval, per-benchmark generate -> grade -> results.json
    metrics    pass@k, maj@K, percentiles, breakdowns: pure functions of graded rows
    targets    which model is evaluated and how it is served (prepare_eval, serving, as_served)
    footprint  parameters, layers and size on disk of a model folder; PeakMemory of the server we launched
    compare    the results table after eval, and `compare` of eval folders (retention, report.md, report.png)
    eval_sets  benchmark loaders: GSM8K, MATH-500, AIME 2024 (offline or hub) and local JSONL files
"""

from cot_distill.evaluate.compare import labels_for, load_results, results_table, retention, run_compare
from cot_distill.evaluate.eval_sets import Benchmark, aime_gold, gsm8k_gold, load_benchmark
from cot_distill.evaluate.footprint import PeakMemory, count_layers, count_parameters, describe_local_model
from cot_distill.evaluate.metrics import benchmark_metrics, ks_up_to, majority_correct, pass_at_k, percentile, vote_key
from cot_distill.evaluate.run import GRADED_FILE, RESULTS_FILE, RESULTS_TABLE, grade_benchmark, run, run_eval
from cot_distill.evaluate.targets import as_served, eval_context, prepare_eval, target_from_endpoint, target_from_model

__all__ = [
    "Benchmark", "GRADED_FILE", "PeakMemory", "RESULTS_FILE", "RESULTS_TABLE", "aime_gold", "as_served",
    "benchmark_metrics", "count_layers", "count_parameters", "describe_local_model", "eval_context",
    "grade_benchmark", "gsm8k_gold", "ks_up_to", "labels_for", "load_benchmark", "load_results",
    "majority_correct", "pass_at_k", "percentile", "prepare_eval", "retention", "results_table", "run",
    "run_compare", "run_eval", "target_from_endpoint", "target_from_model", "vote_key",
]
