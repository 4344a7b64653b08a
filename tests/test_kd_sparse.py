"""cot_distill.kd.sparse_distillation_loss (teacher known by its top-K log-probs) against the dense loss at K = V, a
hand computation at K < V, masking and -inf padding."""

from __future__ import annotations

import math

import pytest
import torch

from cot_distill.kd import (
    DistillationSums,
    distillation_loss,
    sparse_distillation_loss,
    sparse_distillation_sums,
    weighted_distillation_loss,
)

# V = 5, K = 2, three positions; the last is masked and carries ids no gather could take and non-log-prob values.
STUDENT = [[1.0, -0.5, 2.0, 0.3, 0.0], [0.2, 0.9, -1.0, 1.5, 0.4], [40.0, -40.0, 0.0, 0.0, 0.0]]
TOPK_IDS = [[2, 0], [3, 1], [-1, 99]]
TOPK_LOGPROBS = [[-0.4, -1.6], [-0.2, -2.5], [float("nan"), float("inf")]]
LABELS = [2, 1, -100]


def hand_loss(alpha: float, beta: float, temperature: float, kl: str) -> float:
    """The docstring's formula in plain python: both sides renormalised over the top-K ids at temperature tau."""
    ce_terms, kl_terms = [], []
    for z, ids, logprobs, label in zip(STUDENT, TOPK_IDS, TOPK_LOGPROBS, LABELS):
        if label == -100:
            continue
        ce_terms.append(math.log(sum(math.exp(v) for v in z)) - z[label])
        q = [math.exp(lp / temperature) for lp in logprobs]
        p = [math.exp(z[i] / temperature) for i in ids]
        q, p = [v / sum(q) for v in q], [v / sum(p) for v in p]
        a, b = (q, p) if kl == "forward" else (p, q)
        kl_terms.append(sum(x * math.log(x / y) for x, y in zip(a, b)))
    return alpha * sum(ce_terms) / len(ce_terms) + beta * temperature**2 * sum(kl_terms) / len(kl_terms)


def hand_tensors():
    return (torch.tensor(STUDENT, requires_grad=True), torch.tensor(TOPK_IDS), torch.tensor(TOPK_LOGPROBS),
            torch.tensor(LABELS))


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_top_k_equals_the_dense_loss_in_value_and_gradient(kl, temperature):
    torch.manual_seed(0)
    student = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(2, 3, 6, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 4], [-100, 0, 5]])
    # A different random order of the whole vocabulary per position: the ids, not their order, must matter.
    ids = torch.rand(2, 3, 6).argsort(dim=-1)
    logprobs = torch.log_softmax(teacher, dim=-1).gather(-1, ids)

    dense = distillation_loss(student, teacher, labels, 0.3, 0.7, temperature, kl)
    (dense_grad,) = torch.autograd.grad(dense, student)
    sparse = sparse_distillation_loss(student, ids, logprobs, labels, 0.3, 0.7, temperature, kl)
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("alpha,beta,temperature", [(0.5, 0.5, 1.0), (0.3, 0.7, 2.0), (0.0, 1.0, 0.5)])
def test_top_k_below_vocabulary_matches_the_hand_computation(kl, alpha, beta, temperature):
    student, ids, logprobs, labels = hand_tensors()
    loss = sparse_distillation_loss(student, ids, logprobs, labels, alpha, beta, temperature, kl)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(hand_loss(alpha, beta, temperature, kl), rel=1e-5)


def test_masked_positions_change_nothing_and_give_no_nan_gradient():
    student, ids, logprobs, labels = hand_tensors()
    loss = sparse_distillation_loss(student, ids, logprobs, labels, 0.4, 0.6, 2.0, "reverse")
    loss.backward()
    # Other garbage at the masked position: the loss is the same, its row gets no gradient, the rest no NaN.
    student2 = student.detach().clone().requires_grad_(True)
    with torch.no_grad():
        student2[2] = torch.tensor([-90.0, 0.0, 90.0, 1.0, 1.0])
    ids2, logprobs2 = ids.clone(), logprobs.clone()
    ids2[2], logprobs2[2] = torch.tensor([7, -5]), torch.tensor([float("-inf"), float("-inf")])
    loss2 = sparse_distillation_loss(student2, ids2, logprobs2, labels, 0.4, 0.6, 2.0, "reverse")
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.isfinite(student.grad).all() and torch.count_nonzero(student.grad[2]) == 0
    torch.testing.assert_close(student2.grad, student.grad)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_no_scored_position_gives_the_dense_zero_with_a_finite_gradient(kl):
    student, ids, logprobs, _ = hand_tensors()
    none_scored = torch.full((3,), -100)
    dense = distillation_loss(student, torch.randn(3, 5), none_scored, 0.5, 0.5, 2.0, kl)
    loss = sparse_distillation_loss(student, ids, logprobs, none_scored, 0.5, 0.5, 2.0, kl)
    assert dense.item() == 0.0 and loss.item() == dense.item() and loss.requires_grad
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.count_nonzero(student.grad) == 0


# V = 7, K = 4. Row 1 pads with a duplicate of a present id and with -1; row 2 pads with the student's top token, so
# a padding entry that leaked into the student's renormalisation would move the result.
PAD_STUDENT = [[0.5, 1.0, -1.0, 2.0, 0.0, -0.5, 0.3], [1.2, -0.3, 0.8, 0.0, 2.2, -1.0, 0.1],
               [0.0, 0.4, -0.2, 1.1, -0.7, 3.0, 0.9]]
PAD_IDS = [[3, 1, 0, 6], [4, 2, 4, -1], [3, 6, 1, 5]]
PAD_LOGPROBS = [[-0.3, -1.8, -2.4, -3.0], [-0.1, -2.6, float("-inf"), float("-inf")], [-0.7, -1.2, -1.9, float("-inf")]]
PAD_LABELS = [3, 0, 5]
PRESENT = [4, 2, 3]


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_minus_inf_padding_equals_dropping_those_entries(kl):
    student = torch.tensor(PAD_STUDENT, requires_grad=True)
    padded = sparse_distillation_loss(student, torch.tensor(PAD_IDS), torch.tensor(PAD_LOGPROBS),
                                      torch.tensor(PAD_LABELS), 0.3, 0.7, 2.0, kl)
    (padded_grad,) = torch.autograd.grad(padded, student)
    # The reference scores each position alone with its padding cut off (a smaller K per row), then pools the sums.
    parts = [sparse_distillation_sums(student[i:i + 1], torch.tensor([PAD_IDS[i][:k]]),
                                      torch.tensor([PAD_LOGPROBS[i][:k]]), torch.tensor([PAD_LABELS[i]]), 2.0, kl)
             for i, k in enumerate(PRESENT)]
    reference = weighted_distillation_loss(DistillationSums(*(sum(column) for column in zip(*parts))), 0.3, 0.7, 2.0)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(padded, reference)
    torch.testing.assert_close(padded_grad, reference_grad)
    assert torch.isfinite(padded_grad).all()


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_a_scored_position_with_every_entry_padded_adds_no_kl(kl):
    student = torch.tensor([PAD_STUDENT[0]], requires_grad=True)
    sums = sparse_distillation_sums(student, torch.tensor([[1, -1]]), torch.full((1, 2), float("-inf")),
                                    torch.tensor([3]), 2.0, kl)
    assert sums.kl.item() == 0.0 and int(sums.count) == 1
    (grad,) = torch.autograd.grad(sums.kl, student)
    assert torch.count_nonzero(grad) == 0 and torch.isfinite(grad).all()


def test_teacher_log_probs_get_no_gradient_and_bfloat16_is_computed_in_float32():
    student, ids, _, labels = hand_tensors()
    logprobs = torch.tensor(TOPK_LOGPROBS, requires_grad=True)
    loss = sparse_distillation_loss(student.to(torch.bfloat16), ids, logprobs, labels, 0.5, 0.5, 2.0)
    loss.backward()
    assert loss.dtype == torch.float32 and logprobs.grad is None and student.grad is not None


def test_unknown_kl_direction_and_mismatched_top_k_shapes_are_rejected():
    student, ids, logprobs, labels = hand_tensors()
    with pytest.raises(ValueError, match="kl must be one of"):
        sparse_distillation_loss(student, ids, logprobs, labels, 0.5, 0.5, 2.0, kl="jsd")
    with pytest.raises(ValueError, match="differ"):
        sparse_distillation_loss(student, ids[:, :1], logprobs, labels, 0.5, 0.5, 2.0)
