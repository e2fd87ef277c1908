"""Speech2Face encoder loss (Oh et al. 2019, eq. 1), every term per sample.

    L = ||f_dec(v_f) - f_dec(v_s)||_1
        + lambda1 * || v_f/|v_f| - v_s/|v_s| ||_2^2
        + lambda2 * L_distill(f_VGG(v_f), f_VGG(v_s))

v_f: the true face feature, v_s: the feature predicted from speech. f_dec is the frozen face
decoder's first layer, f_VGG the face network's classifier (logits); L_distill is the
cross-entropy of softmax(student / T) under softmax(teacher / T). Each term is computed per
sample and then averaged over the batch (one public re-implementation normalised by the norm
of the whole batch instead of each vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Head = Callable[[torch.Tensor], torch.Tensor]


def normalized_l2_squared(v_face: torch.Tensor, v_speech: torch.Tensor) -> torch.Tensor:
    """|| v_f/|v_f| - v_s/|v_s| ||^2 per row, shape (batch,)."""
    return (F.normalize(v_face, dim=-1) - F.normalize(v_speech, dim=-1)).pow(2).sum(dim=-1)


def l1_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of absolute differences per row, shape (batch,)."""
    return (a - b).abs().flatten(1).sum(dim=-1)


def distillation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum_i p_i(teacher) log p_i(student) with p = softmax(logits / T), per row."""
    teacher = F.softmax(teacher_logits / temperature, dim=-1)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return -(teacher * log_student).sum(dim=-1)


@dataclass
class EncoderLoss:
    """Weights of the terms; a head that is None switches its term off."""

    fdec_weight: float = 1.0
    lambda1: float = 0.025
    lambda2: float = 200.0
    temperature: float = 2.0
    feature_l1_weight: float = 0.0      # plain L1 on the features themselves (not in the paper)
    decoder_head: Head | None = None    # f_dec: frozen first layer of the face decoder
    classifier_head: Head | None = None  # f_VGG: frozen face classifier (fc8 logits)

    def terms(self, v_face: torch.Tensor, v_speech: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each weighted term, averaged over the batch; 'total' is their sum."""
        terms: dict[str, torch.Tensor] = {}
        if self.decoder_head is not None and self.fdec_weight:
            terms["fdec_l1"] = self.fdec_weight * l1_per_sample(
                self.decoder_head(v_face), self.decoder_head(v_speech)).mean()
        if self.lambda1:
            terms["normalized_l2"] = self.lambda1 * normalized_l2_squared(v_face, v_speech).mean()
        if self.classifier_head is not None and self.lambda2:
            terms["distill"] = self.lambda2 * distillation(
                self.classifier_head(v_face), self.classifier_head(v_speech), self.temperature).mean()
        if self.feature_l1_weight:
            terms["feature_l1"] = self.feature_l1_weight * l1_per_sample(v_face, v_speech).mean()
        if not terms:
            raise ValueError("every loss term is switched off")
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms
