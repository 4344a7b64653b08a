"""White-box knowledge distillation loss (Hinton et al., 2015), exactly as written:

    L = alpha * CE(y, softmax(z_s)) + beta * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))

"forward" KL is the one above (teacher || student, mass-covering); "reverse" swaps the arguments
(student || teacher, mode-seeking). The tau^2 factor keeps the KL gradients on the scale of the CE gradients
as tau grows (TRL 1.16's DistillationTrainer divides the logits by its temperature but has no tau^2 factor;
DistillKit's kl.py multiplies by tau^2, as here). Both terms are averaged over the positions whose label is not -100.

The math lives in `distillation_sums` only: the public `distillation_loss` and the trainer's chunked path
(`chunked_distillation_sums`, which never holds logits for more than one chunk of positions) both reduce through it.
Several teachers (kd.teachers) are one teacher whose distribution is the weighted mixture of theirs:

    p_t = sum_i w_i * softmax(z_t,i / tau),   weights w_i >= 0 summing to 1,

computed in log space (logsumexp of log w_i + log_softmax(z_t,i / tau)); the KL, tau^2 and CE are then exactly as
above, so one teacher of weight 1 is the single-teacher loss. `sparse_distillation_loss` is the sparse variant for a teacher known only by its top-K log-probabilities (what an
OpenAI-compatible server returns as top_logprobs): the same loss with both distributions renormalised over the top-K
ids (formula in `sparse_distillation_sums`); it shares the masking, CE, KL and weighting code with the dense one.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
KL_DIRECTIONS = ("forward", "reverse")


class DistillationSums(NamedTuple):
    """Per-token quantities summed over the scored positions, before weighting."""

    ce: torch.Tensor  # cross-entropy of the labels under softmax(z_s), temperature 1
    kl: torch.Tensor  # KL at temperature tau, without beta or tau^2
    count: torch.Tensor  # number of scored positions


def _check_kl(kl: str) -> None:
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be one of {KL_DIRECTIONS}, got {kl!r}")


def _scored_rows(labels: torch.Tensor, *per_position: torch.Tensor):
    """(count, targets, rows): the tensors (..., n) cut to the positions whose label is not -100, as (N, n) rows."""
    scored = labels != IGNORE_INDEX
    if not bool(scored.all()):  # the trainer's chunks hold scored positions only: spare them a copy of the logits
        per_position, labels = tuple(tensor[scored] for tensor in per_position), labels[scored]
    rows = tuple(tensor.reshape(-1, tensor.shape[-1]) for tensor in per_position)
    return scored.sum(), labels.reshape(-1), rows


def _ce_sum(student_log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -student_log_probs.gather(-1, targets.unsqueeze(-1)).sum()


def _kl_sum(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, kl: str) -> torch.Tensor:
    """Summed KL(teacher || student) for "forward", KL(student || teacher) for "reverse", over the last dim."""
    # F.kl_div(input=log q, target=log p, log_target=True) sums p * (log p - log q) = KL(p || q).
    if kl == "forward":
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="sum", log_target=True)
    return F.kl_div(teacher_log_probs, student_log_probs, reduction="sum", log_target=True)


def teacher_log_probs(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float] | None,
                      temperature: float) -> torch.Tensor:
    """log p_t at temperature tau: of one teacher, or of the weighted mixture of several (module docstring).
    Detached and in float32."""
    tempered = [F.log_softmax(logits.detach().float() / temperature, dim=-1) for logits in teacher_logits]
    if len(tempered) == 1:
        return tempered[0]
    weights = weights if weights is not None else [1 / len(tempered)] * len(tempered)
    if len(weights) != len(tempered) or abs(sum(weights) - 1) > 1e-6 or min(weights) < 0:
        raise ValueError(f"teacher weights must be one per teacher, >= 0 and sum to 1, got {list(weights)}")
    return torch.logsumexp(torch.stack([log_p + (math.log(weight) if weight > 0 else -math.inf)
                                        for log_p, weight in zip(tempered, weights)]), dim=0)


def distillation_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor | Sequence[torch.Tensor],
                      labels: torch.Tensor, temperature: float, kl: str = "forward",
                      teacher_weights: Sequence[float] | None = None) -> DistillationSums:
    """Summed CE and KL over the positions where labels != -100. Logits (..., vocab) and labels (...) are aligned
    position by position. `teacher_logits`: one teacher's, or a sequence of several teachers' (with
    `teacher_weights`, default equal), whose mixture is the teacher. Computed in float32; the teachers are
    detached, so gradients reach the student only."""
    _check_kl(kl)
    teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
    count, targets, (student, *teachers) = _scored_rows(labels, student_logits, *teachers)
    student = student.float()
    student_log_probs = F.log_softmax(student, dim=-1)
    student_log_probs_tau = student_log_probs if temperature == 1 else F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs_tau = teacher_log_probs(teachers, teacher_weights, temperature)
    return DistillationSums(_ce_sum(student_log_probs, targets),
                            _kl_sum(student_log_probs_tau, teacher_log_probs_tau, kl), count)


def _log_softmax_over_present(values: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """log_softmax over the entries not marked absent. Absent entries get a huge finite negative instead of -inf:
    exp() of it is exactly 0 beside any present entry, and 0 * (finite difference) keeps the KL and its gradient free
    of the NaN that (-inf) - (-inf) would give; a row with no present entry comes out uniform on both sides (KL 0)."""
    return F.log_softmax(values.masked_fill(absent, torch.finfo(values.dtype).min), dim=-1)


def sparse_distillation_sums(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                             labels: torch.Tensor, temperature: float, kl: str = "forward") -> DistillationSums:
    """distillation_sums for a teacher given by its top-K: topk_ids (..., K) int64 token ids and topk_logprobs
    (..., K) its log-probabilities at temperature 1 over the full vocabulary (log-softmax values, so they sum to <= 1
    in probability), aligned position by position with student_logits (..., V) and labels (...). An entry of
    topk_logprobs equal to -inf is padding (fewer than K alternatives recorded): it is absent, whatever its id.

    At a scored position with S its present ids, l_i the teacher's log-probs and z_i the student's logits:

        q_i = exp(l_i / tau) / sum_{j in S} exp(l_j / tau)       = softmax(topk_logprobs / tau) over S
        p_i = exp(z_i / tau) / sum_{j in S} exp(z_j / tau)       = softmax(z / tau)_i / sum_{j in S} softmax(z / tau)_j
        KL  = sum_{i in S} q_i * (log q_i - log p_i)    ("forward", KL(q || p))
              sum_{i in S} p_i * (log p_i - log q_i)    ("reverse", KL(p || q))
        CE  = -log softmax(z)_y                          (temperature 1, full vocabulary, as in the dense loss)

    The teacher mass outside S (1 - sum_{i in S} exp(l_i)) is dropped by the renormalisation: since l_i is the
    teacher's logit minus a constant, q is exactly the teacher's temperature-tau distribution conditioned on S, for
    any tau; p is the student's, conditioned on the same S. With S the whole vocabulary the renormalisation is a
    no-op and this equals distillation_sums with the teacher's logits. A scored position with S empty adds 0 to KL
    (its CE and count still add). Present ids should be distinct. Positions with label -100 are dropped before
    anything is read, so their ids and log-probs may be anything. float32 math; the teacher side is detached."""
    _check_kl(kl)
    if topk_ids.shape != topk_logprobs.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} differ")
    count, targets, (student, ids, teacher) = _scored_rows(labels, student_logits, topk_ids, topk_logprobs)
    student, teacher = student.float(), teacher.detach().float()
    absent = teacher == float("-inf")
    ids = ids.long().masked_fill(absent, 0)  # padding ids may be out of range (-1): never gather them
    student_log_probs = F.log_softmax(student, dim=-1)
    # Renormalising softmax(z / tau) over S equals a softmax of the gathered z / tau: no second vocabulary pass.
    student_topk_tau = student.gather(-1, ids) / temperature
    student_log_probs_tau = _log_softmax_over_present(student_topk_tau, absent)
    teacher_log_probs_tau = _log_softmax_over_present(teacher / temperature, absent)
    return DistillationSums(_ce_sum(student_log_probs, targets),
                            _kl_sum(student_log_probs_tau, teacher_log_probs_tau, kl), count)


def weighted_distillation_loss(sums: DistillationSums, alpha: float, beta: float, temperature: float,
                               num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """alpha * CE + beta * tau^2 * KL, each averaged over num_tokens (default: the scored positions in sums). A
    batch without scored positions gives a zero that still carries the graph (backward and DDP need one)."""
    count = sums.count if num_tokens is None else num_tokens
    return (alpha * sums.ce + beta * temperature**2 * sums.kl) / torch.as_tensor(count).clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | Sequence[torch.Tensor],
                      labels: torch.Tensor, alpha: float, beta: float, temperature: float, kl: str = "forward",
                      teacher_weights: Sequence[float] | None = None) -> torch.Tensor:
    """The scalar loss above. labels are already aligned with the logits (the caller shifts them); -100 masks.
    Several teachers' logits with `teacher_weights`: their mixture is the teacher (module docstring)."""
    sums = distillation_sums(student_logits, teacher_logits, labels, temperature, kl, teacher_weights)
    return weighted_distillation_loss(sums, alpha, beta, temperature)


def sparse_distillation_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                             labels: torch.Tensor, alpha: float, beta: float, temperature: float,
                             kl: str = "forward") -> torch.Tensor:
    """alpha * mean CE + beta * tau^2 * mean KL over the scored positions, with CE and KL as in
    sparse_distillation_sums (teacher and student renormalised over the teacher's top-K ids); -100 masks."""
    sums = sparse_distillation_sums(student_logits, topk_ids, topk_logprobs, labels, temperature, kl)
    return weighted_distillation_loss(sums, alpha, beta, temperature)


def chunked_distillation_sums(student_hidden: torch.Tensor, targets: torch.Tensor,
                              student_head: Callable[[torch.Tensor], torch.Tensor], *,
                              teacher_hidden: torch.Tensor | Sequence[torch.Tensor],
                              teacher_head: Callable[[torch.Tensor], torch.Tensor] | Sequence[Callable],
                              temperature: float, kl: str = "forward", chunk_tokens: int = 1024,
                              teacher_weights: Sequence[float] | None = None) -> DistillationSums:
    """distillation_sums over the LM heads' logits of (N, hidden) states at scored positions, chunk_tokens rows at a
    time. With more than one chunk and autograd on, each chunk is recomputed in backward instead of keeping its
    logits (torch checkpointing): only one chunk's vocabulary-sized tensors exist at any time, for the price of one
    more pass through the heads. The teachers' heads always run without grad. Several teachers: a sequence of
    hidden states and one of heads, in the same order, mixed with `teacher_weights`."""
    single = isinstance(teacher_hidden, torch.Tensor)
    hiddens, heads = ([teacher_hidden], [teacher_head]) if single else (list(teacher_hidden), list(teacher_head))

    def chunk_sums(student_chunk, *teacher_chunks_and_targets):
        *teacher_chunks, target_chunk = teacher_chunks_and_targets
        with torch.no_grad():
            teacher_logits = [head(chunk) for head, chunk in zip(heads, teacher_chunks)]
        return tuple(distillation_sums(student_head(student_chunk), teacher_logits, target_chunk, temperature, kl,
                                       teacher_weights))

    return _sum_over_chunks(chunk_sums, (student_hidden, *hiddens, targets), chunk_tokens)


def chunked_sparse_distillation_sums(student_hidden: torch.Tensor, targets: torch.Tensor,
                                     student_head: Callable[[torch.Tensor], torch.Tensor], *, topk_ids: torch.Tensor,
                                     topk_logprobs: torch.Tensor, temperature: float, kl: str = "forward",
                                     chunk_tokens: int = 1024) -> DistillationSums:
    """sparse_distillation_sums over the student's LM head on (N, hidden) states at scored positions, with the
    teacher's (N, K) recorded top-K rows aligned to them, chunk by chunk as chunked_distillation_sums does."""

    def chunk_sums(student_chunk, ids_chunk, logprobs_chunk, target_chunk):
        return tuple(sparse_distillation_sums(student_head(student_chunk), ids_chunk, logprobs_chunk, target_chunk,
                                              temperature, kl))

    return _sum_over_chunks(chunk_sums, (student_hidden, topk_ids, topk_logprobs, targets), chunk_tokens)


def _sum_over_chunks(chunk_sums: Callable[..., tuple], per_position: tuple[torch.Tensor, ...],
                     chunk_tokens: int) -> DistillationSums:
    """chunk_sums over row slices of the per-position tensors (the last one is the targets), summed; each chunk is
    recomputed in backward when there is more than one and autograd is on."""
    count = len(per_position[-1])
    recompute = torch.is_grad_enabled() and count > chunk_tokens
    parts = []
    for start in range(0, max(count, 1), chunk_tokens):  # at least one (empty) chunk: a zero with a graph
        args = tuple(tensor[start:start + chunk_tokens] for tensor in per_position)
        if recompute:
            parts.append(checkpoint(chunk_sums, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(chunk_sums(*args))
    ce, divergence, count = (torch.stack(column).sum() for column in zip(*parts))
    return DistillationSums(ce, divergence, count)
