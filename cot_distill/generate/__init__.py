"""The generate stage.

    requests  SampleRequest, request keys, planning prompts x samples
    ledger    samples.jsonl as the ledger: done keys, Sample records, failures, totals
    run       run(recipe, *, slot=None), the stage; generate_samples(prompts, teacher, gen, ...) for eval
"""

from cot_distill.generate.ledger import (
                                         FAILURES_FILE,
                                         SAMPLES_FILE,
                                         STATS_FILE,
                                         done_keys,
                                         failure_record,
                                         make_sample,
                                         summarize_ledger,
)
from cot_distill.generate.requests import (
                                         RequestPlan,
                                         SampleRequest,
                                         build_requests,
                                         params_for,
                                         plan_requests,
                                         request_key,
)
from cot_distill.generate.run import GenerateError, generate_samples, resume_seed, run, run_generate

__all__ = [
    "FAILURES_FILE", "SAMPLES_FILE", "STATS_FILE", "GenerateError", "RequestPlan", "SampleRequest", "build_requests", "done_keys",
    "failure_record", "generate_samples", "make_sample", "params_for", "plan_requests", "request_key",
    "resume_seed", "run", "run_generate", "summarize_ledger",
]
