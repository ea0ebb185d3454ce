"""Training losses as pure functions of logits: usable outside the trainer, tested on hand values.

All of them compute in float32 whatever the autocast dtype of the logits, because a bf16 softmax
at temperature T loses the small probabilities that the distillation terms are made of.
"""
import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch, in float32."""
    return F.cross_entropy(logits.float(), targets)


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, averaged over rows.

    This is the reference's `KDLoss`: `KLDivLoss(reduction='sum')(log_p, q) * T**2 / batch`.
    The teacher side is detached: gradients flow through the student logits only.
    """
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    return kl * (temperature**2) / student_logits.shape[0]


def cskd_loss(
    logits: torch.Tensor, targets: torch.Tensor, pair_logits: torch.Tensor, temperature: float, lam: float
) -> torch.Tensor:
    """CS-KD objective (Yun et al. 2020, eq. 1): CE(anchors) + lam * T^2 * KL(p(x'/T) || p(x/T)).

    `logits` are the anchors' (with gradient), `pair_logits` those of same-class partners x'
    (treated as a fixed teacher), row i of each belonging together. Returns a 0-dim tensor.
    """
    return cross_entropy(logits, targets) + lam * kd_kl_div(logits, pair_logits, temperature)
