"""White-box knowledge distillation loss (Hinton et al., 2015), exactly as written:

    L = alpha * CE(y, softmax(z_s)) + beta * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))

"forward" KL is the one above (teacher || student, mass-covering); "reverse" swaps the arguments
(student || teacher, mode-seeking). The tau^2 factor keeps the KL gradients on the scale of the CE gradients
as tau grows (TRL's GKD applies no temperature, DistillKit drops the factor). Both terms are averaged over the
positions whose label is not -100.

The math lives in `distillation_sums` only: the public `distillation_loss` and the trainer's chunked path
(`chunked_distillation_sums`, which never holds logits for more than one chunk of positions) both reduce through it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

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


def distillation_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, kl: str = "forward") -> DistillationSums:
    """Summed CE and KL over the positions where labels != -100. Logits (..., vocab) and labels (...) are aligned
    position by position. Computed in float32; the teacher is detached, so gradients reach the student only."""
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be one of {KL_DIRECTIONS}, got {kl!r}")
    scored = labels != IGNORE_INDEX
    if not bool(scored.all()):  # the trainer's chunks hold scored positions only: spare them a copy of the logits
        student_logits, teacher_logits, labels = student_logits[scored], teacher_logits[scored], labels[scored]
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).float()
    teacher = teacher_logits.reshape(-1, vocab).detach().float()
    targets = labels.reshape(-1)
    student_log_probs = F.log_softmax(student, dim=-1)
    ce = -student_log_probs.gather(-1, targets.unsqueeze(-1)).sum()
    student_log_probs_tau = student_log_probs if temperature == 1 else F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs_tau = F.log_softmax(teacher / temperature, dim=-1)
    # F.kl_div(input=log q, target=log p, log_target=True) sums p * (log p - log q) = KL(p || q).
    if kl == "forward":
        divergence = F.kl_div(student_log_probs_tau, teacher_log_probs_tau, reduction="sum", log_target=True)
    else:
        divergence = F.kl_div(teacher_log_probs_tau, student_log_probs_tau, reduction="sum", log_target=True)
    return DistillationSums(ce, divergence, scored.sum())


def weighted_distillation_loss(sums: DistillationSums, alpha: float, beta: float, temperature: float,
                               num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """alpha * CE + beta * tau^2 * KL, each averaged over num_tokens (default: the scored positions in sums). A
    batch without scored positions gives a zero that still carries the graph (backward and DDP need one)."""
    count = sums.count if num_tokens is None else num_tokens
    return (alpha * sums.ce + beta * temperature**2 * sums.kl) / torch.as_tensor(count).clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, beta: float, temperature: float, kl: str = "forward") -> torch.Tensor:
    """The scalar loss above. labels are already aligned with the logits (the caller shifts them); -100 masks."""
    sums = distillation_sums(student_logits, teacher_logits, labels, temperature, kl)
    return weighted_distillation_loss(sums, alpha, beta, temperature)


def chunked_distillation_sums(student_hidden: torch.Tensor, targets: torch.Tensor,
                              student_head: Callable[[torch.Tensor], torch.Tensor], *, teacher_hidden: torch.Tensor,
                              teacher_head: Callable[[torch.Tensor], torch.Tensor], temperature: float,
                              kl: str = "forward", chunk_tokens: int = 1024) -> DistillationSums:
    """distillation_sums over the LM heads' logits of (N, hidden) states at scored positions, chunk_tokens rows at a
    time. With more than one chunk and autograd on, each chunk is recomputed in backward instead of keeping its
    logits (torch checkpointing): only one chunk's vocabulary-sized tensors exist at any time, for the price of one
    more pass through both heads. The teacher's head always runs without grad."""

    def chunk_sums(student_chunk, teacher_chunk, target_chunk):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_chunk)
        return tuple(distillation_sums(student_head(student_chunk), teacher_logits, target_chunk, temperature, kl))

    recompute = torch.is_grad_enabled() and len(targets) > chunk_tokens
    parts = []
    for start in range(0, max(len(targets), 1), chunk_tokens):  # at least one (empty) chunk: a zero with a graph
        chunk = slice(start, start + chunk_tokens)
        args = (student_hidden[chunk], teacher_hidden[chunk], targets[chunk])
        if recompute:
            parts.append(checkpoint(chunk_sums, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(chunk_sums(*args))
    ce, divergence, count = (torch.stack(column).sum() for column in zip(*parts))
    return DistillationSums(ce, divergence, count)
