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


def mmd_linear(features1: torch.Tensor, features2: torch.Tensor) -> torch.Tensor:
    """Linear-kernel MMD^2 between two batches of embeddings: ||mean(features1) - mean(features2)||^2.

    With k(a, b) = a.b the (biased) estimate mean k(f1, f1') + mean k(f2, f2') - 2 mean k(f1, f2)
    is exactly the squared distance between the batch means. Gradients flow into both sides.
    """
    return (features1.float().mean(0) - features2.float().mean(0)).pow(2).sum()


def ddgsd_loss(logits1: torch.Tensor, logits2: torch.Tensor, features1: torch.Tensor, features2: torch.Tensor,
               targets: torch.Tensor, temperature: float, kl_weight: float, mmd_weight: float) -> torch.Tensor:
    """DDGSD (Xu & Liu, AAAI 2019) on two augmented views of the same images (row i of each).

    CE(view 1) + CE(view 2) + kl_weight * (KL(p2 || p1) + KL(p1 || p2)) + mmd_weight * MMD^2(f1, f2):
    each KL direction is `kd_kl_div` (T^2-scaled, its target view detached, so each view is pulled
    towards the other), and the MMD is `mmd_linear` on the penultimate features.
    """
    ce = cross_entropy(logits1, targets) + cross_entropy(logits2, targets)
    kl = kd_kl_div(logits1, logits2, temperature) + kd_kl_div(logits2, logits1, temperature)
    return ce + kl_weight * kl + mmd_weight * mmd_linear(features1, features2)


def byot_hint_loss(aux_features: torch.Tensor, final_features: torch.Tensor) -> torch.Tensor:
    """BYOT's L2 hint: sum over rows and dimensions of (aux - final)^2 where aux > 0 or final > 0.

    As in luanyunteng/pytorch-be-your-own-teacher `feature_loss_function`: a *sum* (not a mean), which
    its weight beta = 1e-6 is sized for, and the mask skips entries where both are <= 0 (a post-ReLU
    feature at 0 is not pushed towards a negative target). The final features are the target: detached.
    """
    aux = aux_features.float()
    final = final_features.detach().float()
    return ((aux - final).pow(2) * ((aux > 0) | (final > 0))).sum()


def byot_loss(logits: torch.Tensor, features: torch.Tensor, aux_logits: list[torch.Tensor],
              aux_features: list[torch.Tensor], targets: torch.Tensor, temperature: float, alpha: float,
              beta: float) -> torch.Tensor:
    """BYOT (Zhang et al., ICCV 2019): the final head teaches the auxiliary heads of the shallower stages.

    (1 - alpha) * sum of CE over all heads (final included) + alpha * sum over auxiliary heads of
    T^2 * KL(p_final/T || p_aux/T) + beta * sum over auxiliary heads of `byot_hint_loss(aux, final)`.
    The final logits and features are targets only (detached). The reference uses the soft cross-
    entropy instead of the KL: they differ by the target's entropy, a constant, so gradients agree.
    """
    ce = cross_entropy(logits, targets) + sum(cross_entropy(a, targets) for a in aux_logits)
    kd = sum(kd_kl_div(a, logits, temperature) for a in aux_logits)
    hint = sum(byot_hint_loss(f, features) for f in aux_features)
    return (1 - alpha) * ce + alpha * kd + beta * hint


def cskd_e_loss(aug_logits: torch.Tensor, targets: torch.Tensor, pair_logits: torch.Tensor,
                clean_logits: torch.Tensor, temperature: float, lam: float, lam_e: float) -> torch.Tensor:
    """CS-KD-E (Yun et al. 2020, Sec. 3.4): CS-KD on augmented views + lam_e * T^2 * KL(p(x/T) || p(x_aug/T)).

    `aug_logits` are the augmented anchors' (with gradient), `pair_logits` their same-class partners',
    `clean_logits` those of the anchors' other view x; partners and x are fixed targets (detached).
    """
    return cskd_loss(aug_logits, targets, pair_logits, temperature, lam) + lam_e * kd_kl_div(
        aug_logits, clean_logits, temperature)


def mixup_cross_entropy(logits: torch.Tensor, targets_a: torch.Tensor, targets_b: torch.Tensor,
                        lam: float) -> torch.Tensor:
    """Mixup loss (Zhang et al., ICLR 2018): lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b).

    `logits` are those of the mixed inputs lam * x_a + (1 - lam) * x_b; the CE of the mixed label
    is linear in the target, so this equals CE against the soft target lam * y_a + (1 - lam) * y_b
    (facebookresearch/mixup-cifar10 `mixup_criterion`)."""
    return lam * cross_entropy(logits, targets_a) + (1 - lam) * cross_entropy(logits, targets_b)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """Hinton et al. (2015) KD: (1 - alpha) * CE(student, y) + alpha * T^2 * KL(p_teacher^T || p_student^T).

    PS-KD's Eq. 2 writes the soft term as a cross-entropy H(p_teacher^T, p_student^T); the KL used
    here differs from it by the teacher's entropy, a constant: same gradients, a loss that is 0 at a
    perfect match. The teacher side is detached."""
    return (1 - alpha) * cross_entropy(student_logits, targets) + alpha * kd_kl_div(student_logits, teacher_logits,
                                                                                     temperature)


LS_CONVENTIONS = ("uniform", "others")


def label_smoothing_loss(logits: torch.Tensor, targets: torch.Tensor, epsilon: float,
                         convention: str = "uniform") -> torch.Tensor:
    """Mean CE against smoothed targets, in float32.

    `uniform`: (1 - eps) * one-hot + eps/C to every class (the papers' formula, = PyTorch's
    `label_smoothing=eps`); `others`: 1 - eps on the true class and eps/(C-1) on each other one
    (TF-KD, Self-KD-Lib)."""
    num_classes = logits.shape[1]
    if convention == "uniform":
        on, off = 1 - epsilon + epsilon / num_classes, epsilon / num_classes
    elif convention == "others":
        on, off = 1 - epsilon, epsilon / (num_classes - 1)
    else:
        raise ValueError(f"convention must be one of {LS_CONVENTIONS}, got {convention!r}")
    log_p = F.log_softmax(logits.float(), dim=1)
    target = torch.full_like(log_p, off).scatter_(1, targets[:, None], on)
    return -(target * log_p).sum(1).mean()


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) in nats, per row, averaged over the rows; in float32."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()


def max_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """Confidence penalty (Pereyra et al. 2017): mean CE - beta * mean entropy of the softmax."""
    return cross_entropy(logits, targets) - beta * softmax_entropy(logits)


@torch.no_grad()
def adacos_scale(cos: torch.Tensor, targets: torch.Tensor, s) -> torch.Tensor:
    """AdaCos's adaptive scale (Zhang et al. 2019) from one batch's cosines (B, C) and the current scale `s`.

    B_avg = sum over the non-target classes of exp(s * cos), divided by the batch size; theta_med =
    the median target angle (torch.median: the lower middle value of an even count, as the reference
    4uiiurz1/pytorch-adacos); returns ln(B_avg) / cos(min(pi/4, theta_med)) as a 0-dim float32 tensor."""
    cos = cos.float()
    target = F.one_hot(targets, cos.shape[1]).bool()
    b_avg = torch.where(target, 0.0, torch.exp(s * cos)).sum() / cos.shape[0]
    theta = torch.acos(cos[target].clamp(-1 + 1e-7, 1 - 1e-7))  # the reference's clamp keeps acos finite
    theta_med = theta.median().clamp(max=torch.pi / 4)
    return torch.log(b_avg) / torch.cos(theta_med)


def virtual_softmax_loss(logits: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> torch.Tensor:
    """Virtual-softmax (Chen et al. 2018): mean CE over the C logits plus a virtual one, target y.

    `logits` = features @ weight.T (bias-free); sample i's virtual logit is ||W_{y_i}|| * ||x_i||, each
    sample's own norm. Gradients reach the weight through the logits and through ||W_y||."""
    virtual = weight[targets].float().norm(dim=1) * features.float().norm(dim=1)
    return F.cross_entropy(torch.cat([logits.float(), virtual[:, None]], dim=1), targets)


def pskd_alpha(alpha_T: float, epoch: int, epochs: int) -> float:
    """PS-KD's weight of the past predictions at 0-based `epoch`: alpha_t = alpha_T * (epoch + 1) / epochs.

    Kim et al. (ICCV 2021) Eq. 6 with t = epoch + 1, as the official code counts it
    (lgcnsai/PS-KD-Pytorch main.py: `alpha_t = alpha_T * ((epoch + 1) / end_epoch)`): it grows
    linearly and reaches alpha_T in the last epoch."""
    return alpha_T * (epoch + 1) / epochs


def pskd_targets(targets: torch.Tensor, teacher_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """PS-KD's soft targets (1 - alpha) * one-hot(y) + alpha * P_{t-1}(x), in float32 (rows of `teacher_probs`)."""
    one_hot = F.one_hot(targets, teacher_probs.shape[1]).float()
    return (1 - alpha) * one_hot + alpha * teacher_probs.float()


def pskd_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor, alpha: float,
              ignore_index: int | None = None) -> torch.Tensor:
    """PS-KD (Kim et al., ICCV 2021, Eq. 5): mean over rows of H((1 - alpha) * y + alpha * P_{t-1}(x), P_t(x)).

    `logits` (N, C), `targets` (N,) class ids, `teacher_probs` (N, C) the teacher's probabilities
    for the same rows (last epoch's, detached), `alpha` the epoch's weight (`pskd_alpha`). The
    cross-entropy is against the soft target, summed over classes (the official code's
    `Custom_CrossEntropy_PSKD`). Rows whose target is `ignore_index` (padding tokens when the
    rows are a sequence's positions over a vocabulary) count neither in the sum nor in the mean.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    if ignore_index is None:
        return -(pskd_targets(targets, teacher_probs.detach(), alpha) * log_p).sum(1).mean()
    keep = targets != ignore_index
    soft = pskd_targets(torch.where(keep, targets, 0), teacher_probs.detach(), alpha)
    per_row = -(soft * log_p).sum(1) * keep
    return per_row.sum() / keep.sum().clamp(min=1)


def _kl_div_mean(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """`nn.KLDivLoss()`'s default reduction 'mean': the sum of q * (log q - log p) over all N*C entries,
    divided by N*C. Written out: PyTorch warns that reduction='mean' will come to mean 'batchmean'."""
    return F.kl_div(log_p, log_q, reduction="sum", log_target=True) / log_p.numel()


def tfkd_self_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 multiplier: float) -> torch.Tensor:
    """TF-KD_self's soft term: KLDivLoss()(log_softmax(s/T), softmax(t/T)) * T^2 * multiplier.

    As yuanli2333/Teacher-free-Knowledge-Distillation `loss_kd_self`: KLDivLoss's default 'mean'
    divides by N*C (not by N as `kd_kl_div` does), which `multiplier` offsets. Teacher detached."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return _kl_div_mean(log_p, log_q) * temperature**2 * multiplier


def tfkd_self_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                   alpha: float, multiplier: float) -> torch.Tensor:
    """TF-KD_self (Yuan et al., CVPR 2020): (1 - alpha) * CE + alpha * `tfkd_self_kl`, the teacher a
    pretrained model of the student's architecture (reference `loss_kd_self`)."""
    return (1 - alpha) * cross_entropy(logits, targets) + alpha * tfkd_self_kl(logits, teacher_logits, temperature,
                                                                                multiplier)


def tfkd_reg_distribution(targets: torch.Tensor, num_classes: int, correct_prob: float = 0.99) -> torch.Tensor:
    """TF-KD_reg's hand-designed teacher p^d (N, C): `correct_prob` on the true class, (1 - correct_prob)/(C - 1)
    on each other one (reference `loss_kd_regularization`), in float32."""
    p_d = torch.full((len(targets), num_classes), (1 - correct_prob) / (num_classes - 1), device=targets.device)
    return p_d.scatter_(1, targets[:, None], correct_prob)


def tfkd_reg_kl(logits: torch.Tensor, targets: torch.Tensor, temperature: float, multiplier: float,
                correct_prob: float = 0.99) -> torch.Tensor:
    """TF-KD_reg's soft term: KLDivLoss()(log_softmax(s), softmax(p^d / T)) * multiplier (mean over N*C).

    As the reference: softmax is applied to p^d, a probability vector, which flattens it towards
    uniform (at T=20, C=100 the true class gets about 1.05/C); the student is not divided by T, and
    there is no T^2."""
    p_d = tfkd_reg_distribution(targets, logits.shape[1], correct_prob)
    return _kl_div_mean(F.log_softmax(logits.float(), dim=1), F.log_softmax(p_d / temperature, dim=1)) * multiplier


def tfkd_reg_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float, multiplier: float,
                  correct_prob: float = 0.99) -> torch.Tensor:
    """TF-KD_reg (Yuan et al., CVPR 2020): (1 - alpha) * CE + alpha * `tfkd_reg_kl` (reference
    `loss_kd_regularization`)."""
    return (1 - alpha) * cross_entropy(logits, targets) + alpha * tfkd_reg_kl(logits, targets, temperature,
                                                                               multiplier, correct_prob)
