"""cot_distill.kd against a hand computation (numpy, written out term by term) on fixed logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cot_distill.kd import chunked_distillation_sums, distillation_loss, distillation_sums

# 2 sequences x 3 positions x vocabulary 4; -100 masks the middle position of the first and the first of the second.
STUDENT = [[[2.0, 1.0, 0.1, -1.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 3.0, 0.0, 1.0]],
           [[9.0, 9.0, 9.0, 9.0], [1.5, -0.5, 2.5, 0.0], [0.0, 0.2, -0.4, 4.0]]]
TEACHER = [[[1.0, 2.0, 0.0, 0.5], [3.0, -3.0, 0.0, 0.0], [0.0, 4.0, 1.0, -2.0]],
           [[-9.0, 9.0, -9.0, 9.0], [2.0, 0.0, 1.0, 1.0], [1.0, -1.0, 0.0, 2.0]]]
LABELS = [[0, -100, 1], [-100, 2, 3]]


def softmax(row: list[float], temperature: float) -> np.ndarray:
    scaled = np.array(row, dtype=np.float64) / temperature
    exps = np.exp(scaled - scaled.max())
    return exps / exps.sum()


def hand_loss(alpha: float, beta: float, temperature: float, kl: str, labels=LABELS) -> float:
    ce_terms, kl_terms = [], []
    for student_row, teacher_row, label_row in zip(STUDENT, TEACHER, labels):
        for student, teacher, label in zip(student_row, teacher_row, label_row):
            if label == -100:
                continue
            ce_terms.append(-np.log(softmax(student, 1.0)[label]))
            p_teacher, p_student = softmax(teacher, temperature), softmax(student, temperature)
            p, q = (p_teacher, p_student) if kl == "forward" else (p_student, p_teacher)
            kl_terms.append(float(np.sum(p * np.log(p / q))))
    return alpha * np.mean(ce_terms) + beta * temperature**2 * np.mean(kl_terms)


def tensors(labels=LABELS):
    student = torch.tensor(STUDENT, requires_grad=True)
    return student, torch.tensor(TEACHER, requires_grad=True), torch.tensor(labels)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("alpha,beta,temperature", [(0.5, 0.5, 2.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0),
                                                    (0.3, 0.7, 4.0), (0.2, 1.5, 0.5)])
def test_matches_the_hand_computation(kl, alpha, beta, temperature):
    student, teacher, labels = tensors()
    loss = distillation_loss(student, teacher, labels, alpha, beta, temperature, kl)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(hand_loss(alpha, beta, temperature, kl), rel=1e-5)


def test_kl_term_is_scaled_by_tau_squared_and_directions_differ():
    student, teacher, labels = tensors()
    for temperature in (1.0, 2.0, 3.0):
        forward = distillation_loss(student, teacher, labels, 0.0, 1.0, temperature, "forward").item()
        raw_kl = hand_loss(0.0, 1.0, temperature, "forward") / temperature**2
        assert forward == pytest.approx(temperature**2 * raw_kl, rel=1e-5)
    forward = distillation_loss(student, teacher, labels, 0.0, 1.0, 2.0, "forward").item()
    reverse = distillation_loss(student, teacher, labels, 0.0, 1.0, 2.0, "reverse").item()
    assert abs(forward - reverse) > 1e-3  # KL is not symmetric on these logits


def test_sums_hold_the_unweighted_parts_the_trainer_logs():
    student, teacher, labels = tensors()
    sums = distillation_sums(student, teacher, labels, temperature=2.0, kl="reverse")
    assert int(sums.count) == 4
    assert (sums.ce / sums.count).item() == pytest.approx(hand_loss(1.0, 0.0, 2.0, "reverse"), rel=1e-5)
    assert (sums.kl / sums.count).item() == pytest.approx(hand_loss(0.0, 1.0, 2.0, "reverse") / 4.0, rel=1e-5)


def test_masked_positions_do_not_count():
    student, teacher, labels = tensors()
    loss = distillation_loss(student, teacher, labels, 0.5, 0.5, 2.0)
    # The masked positions hold extreme logits: changing them must change nothing.
    student2, teacher2 = student.detach().clone(), teacher.detach().clone()
    student2[0, 1], teacher2[1, 0] = torch.tensor([50.0, -50.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 80.0, 0.0])
    assert distillation_loss(student2, teacher2, labels, 0.5, 0.5, 2.0).item() == pytest.approx(loss.item(), rel=1e-6)
    only_one = [[-100, -100, 1], [-100, -100, -100]]
    one_loss = distillation_loss(student, teacher, torch.tensor(only_one), 0.5, 0.5, 2.0)
    assert one_loss.item() == pytest.approx(hand_loss(0.5, 0.5, 2.0, "forward", labels=only_one), rel=1e-5)


def test_no_scored_position_gives_a_zero_with_grad():
    student, teacher, _ = tensors()
    loss = distillation_loss(student, teacher, torch.full((2, 3), -100), 0.5, 0.5, 2.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(student.grad) == 0


def test_gradient_reaches_the_student_only_and_matches_the_closed_form():
    student, teacher, labels = tensors()
    alpha, beta, temperature = 0.4, 0.6, 2.0
    distillation_loss(student, teacher, labels, alpha, beta, temperature, "forward").backward()
    assert teacher.grad is None
    # d/dz [alpha * CE + beta * tau^2 * KL(p_t || p_s)] = alpha * (softmax(z) - onehot) + beta * tau * (p_s - p_t)
    count = sum(label != -100 for row in LABELS for label in row)
    for b, t in [(0, 0), (0, 2), (1, 1), (1, 2)]:
        onehot = np.eye(4)[LABELS[b][t]]
        expected = (alpha * (softmax(STUDENT[b][t], 1.0) - onehot) + beta * temperature
                    * (softmax(STUDENT[b][t], temperature) - softmax(TEACHER[b][t], temperature))) / count
        assert np.allclose(student.grad[b, t].numpy(), expected, atol=1e-6)
    assert torch.count_nonzero(student.grad[0, 1]) == 0 and torch.count_nonzero(student.grad[1, 0]) == 0


def test_bfloat16_logits_are_computed_in_float32():
    student, teacher, labels = tensors()
    loss = distillation_loss(student.to(torch.bfloat16), teacher.to(torch.bfloat16), labels, 0.5, 0.5, 2.0)
    assert loss.dtype == torch.float32


def test_unknown_kl_direction_is_rejected():
    student, teacher, labels = tensors()
    with pytest.raises(ValueError, match="kl must be one of"):
        distillation_loss(student, teacher, labels, 0.5, 0.5, 2.0, kl="jsd")


def heads(vocab: int = 11, student_dim: int = 6, teacher_dim: int = 8):
    torch.manual_seed(0)
    return torch.nn.Linear(student_dim, vocab, bias=False), torch.nn.Linear(teacher_dim, vocab, bias=False)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 13, 100])
def test_chunked_equals_unchunked_in_value_and_gradient(kl, chunk_tokens):
    student_head, teacher_head = heads()
    hidden = torch.randn(13, 6, requires_grad=True)
    teacher_hidden, targets = torch.randn(13, 8), torch.randint(0, 11, (13,))

    expected = distillation_loss(student_head(hidden), teacher_head(teacher_hidden), targets, 0.3, 0.7, 2.0, kl)
    expected_grads = torch.autograd.grad(expected, [hidden, student_head.weight])
    sums = chunked_distillation_sums(hidden, targets, student_head, teacher_hidden=teacher_hidden,
                                     teacher_head=teacher_head, temperature=2.0, kl=kl, chunk_tokens=chunk_tokens)
    loss = (0.3 * sums.ce + 0.7 * 4.0 * sums.kl) / sums.count
    grads = torch.autograd.grad(loss, [hidden, student_head.weight])
    assert int(sums.count) == 13 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-6)
    assert teacher_head.weight.grad is None


def saved_for_backward_numel(run) -> int:
    """Elements autograd keeps for backward while run() builds its graph."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        result = run()
    result.ce.backward()  # the graph is usable
    return sum(saved)


def test_chunks_keep_no_vocabulary_sized_tensor_for_backward():
    vocab, tokens, chunk = 512, 64, 16
    student_head, teacher_head = heads(vocab=vocab)
    hidden, teacher_hidden = torch.randn(tokens, 6, requires_grad=True), torch.randn(tokens, 8)
    targets = torch.randint(0, vocab, (tokens,))

    def run(chunk_tokens):
        return lambda: chunked_distillation_sums(hidden, targets, student_head, teacher_hidden=teacher_hidden,
                                                 teacher_head=teacher_head, temperature=2.0, chunk_tokens=chunk_tokens)

    whole = saved_for_backward_numel(run(tokens))
    chunked = saved_for_backward_numel(run(chunk))
    assert whole >= tokens * vocab  # one chunk: the logits of every position are kept
    assert chunked < tokens * vocab / 4  # recomputed per chunk: only the (tokens x hidden) inputs are kept


def test_a_mixture_is_the_weighted_average_of_the_teachers_tempered_probabilities():
    torch.manual_seed(3)
    student, first, second = (torch.randn(2, 3, 5) for _ in range(3))
    labels = torch.tensor([[1, -100, 2], [0, 4, -100]])
    temperature, weights = 2.0, [0.25, 0.75]
    mixture = 0.25 * torch.softmax(first / temperature, -1) + 0.75 * torch.softmax(second / temperature, -1)
    scored = labels != -100
    log_q = torch.log_softmax(student / temperature, -1)[scored]
    kl = (mixture[scored] * (mixture[scored].log() - log_q)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(student[scored], labels[scored])
    expected = 0.4 * ce + 0.6 * temperature**2 * kl
    got = distillation_loss(student, [first, second], labels, 0.4, 0.6, temperature, teacher_weights=weights)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # one teacher of weight 1, and two copies of one teacher, are that teacher
    single = distillation_loss(student, first, labels, 0.4, 0.6, temperature, kl="reverse")
    assert distillation_loss(student, [first], labels, 0.4, 0.6, temperature, kl="reverse",
                             teacher_weights=[1.0]).item() == pytest.approx(single.item(), rel=1e-6)
    assert distillation_loss(student, [first, first], labels, 0.4, 0.6, temperature, kl="reverse",
                             teacher_weights=[0.5, 0.5]).item() == pytest.approx(single.item(), rel=1e-5)
    with pytest.raises(ValueError, match="sum to 1"):
        distillation_loss(student, [first, second], labels, 0.4, 0.6, temperature, teacher_weights=[0.5, 0.6])


def test_chunked_mixture_equals_unchunked():
    student_head, first_head = heads()
    _, second_head = heads(vocab=11, teacher_dim=8)
    second_head.weight.data.mul_(3.0)
    hidden = torch.randn(9, 6, requires_grad=True)
    first_hidden, second_hidden, targets = torch.randn(9, 8), torch.randn(9, 8), torch.randint(0, 11, (9,))
    expected = distillation_loss(student_head(hidden), [first_head(first_hidden), second_head(second_hidden)],
                                 targets, 0.3, 0.7, 2.0, teacher_weights=[0.6, 0.4])
    sums = chunked_distillation_sums(hidden, targets, student_head, teacher_hidden=[first_hidden, second_hidden],
                                     teacher_head=[first_head, second_head], temperature=2.0, chunk_tokens=4,
                                     teacher_weights=[0.6, 0.4])
    assert ((0.3 * sums.ce + 0.7 * 4.0 * sums.kl) / sums.count).item() == pytest.approx(expected.item(), rel=1e-5)
