"""Encoder loss terms on hand-computed values, per sample."""

from __future__ import annotations

import math

import pytest
import torch

from speech2face.models.losses import EncoderLoss, distillation, normalized_l2_squared


def test_normalized_l2_is_per_sample() -> None:
    face = torch.tensor([[3.0, 4.0], [0.0, 10.0]])
    speech = torch.tensor([[6.0, 8.0], [1.0, 0.0]])
    # row 0: same direction -> 0; row 1: orthogonal unit vectors -> |(0,1)-(1,0)|^2 = 2
    assert normalized_l2_squared(face, speech).tolist() == pytest.approx([0.0, 2.0])
    # a batch-norm normalisation would give a different value for row 0
    batch_normed = ((face / face.norm()) - (speech / speech.norm())).pow(2).sum(dim=1)
    assert batch_normed[0] > 1e-3


def test_distillation_matches_hand_computation() -> None:
    teacher = torch.tensor([[2.0, 0.0]])
    student = torch.tensor([[0.0, 2.0]])
    t = 2.0
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]   # softmax([1, 0])
    q = [1 / (math.exp(1) + 1), math.exp(1) / (math.exp(1) + 1)]   # softmax([0, 1])
    expected = -(p[0] * math.log(q[0]) + p[1] * math.log(q[1]))
    assert distillation(teacher, student, t).item() == pytest.approx(expected, rel=1e-6)


def test_total_is_weighted_sum_of_terms() -> None:
    face = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    speech = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.bias.zero_()
    loss = EncoderLoss(fdec_weight=1.0, lambda1=0.5, lambda2=10.0, temperature=2.0, feature_l1_weight=0.1,
                       decoder_head=head, classifier_head=head)
    terms = loss.terms(face, speech)
    # f_dec L1: row0 |(1,0,1)-(0,1,1)| = 2, row1 |(0,2,2)-(0,1,1)| = 2 -> mean 2
    assert terms["fdec_l1"].item() == pytest.approx(2.0)
    assert terms["normalized_l2"].item() == pytest.approx(0.5 * (2.0 + 0.0) / 2)
    assert terms["feature_l1"].item() == pytest.approx(0.1 * (2.0 + 1.0) / 2)
    expected_distill = 10.0 * distillation(head(face), head(speech), 2.0).mean().item()
    assert terms["distill"].item() == pytest.approx(expected_distill)
    assert terms["total"].item() == pytest.approx(sum(v.item() for k, v in terms.items() if k != "total"))


def test_terms_without_heads_are_off() -> None:
    terms = EncoderLoss().terms(torch.ones(2, 4), torch.ones(2, 4))
    assert set(terms) == {"normalized_l2", "total"}
    with pytest.raises(ValueError):
        EncoderLoss(lambda1=0.0).terms(torch.ones(1, 2), torch.ones(1, 2))
