"""Teacher-free KD (Yuan et al., CVPR 2020), both variants of yuanli2333/Teacher-free-Knowledge-Distillation.

`tfkd.mode=self` (Tf-KD_self, reference `loss_kd_self`): a pretrained model of the student's own
architecture teaches it, (1 - alpha) * CE + alpha * KLDivLoss()(log_softmax(s/T), softmax(t/T)) * T^2
* multiplier. The teacher is the finished run dir `tfkd.teacher`, loaded frozen as kd's
(`cskd.teacher`: eval mode, no_grad, sha256 identity checked on resume). That it has the student's
architecture is the paper's setting, not checked here (the method does not see the student's model).

`tfkd.mode=reg` (Tf-KD_reg, reference `loss_kd_regularization`): no network teacher; a hand-designed
one puts 0.99 on the true class and 0.01/(C-1) on each other one, and the loss is (1 - alpha) * CE +
alpha * KLDivLoss()(log_softmax(s), softmax(p^d/T)) * multiplier, without T^2 and without dividing
the student by T. The softmax is applied to a probability vector, as the reference does.

KLDivLoss() reduces by its default 'mean', over N*C entries; `multiplier` offsets that. The modes'
defaults differ, so each has its own keys (`self_*`, `reg_*`); only the chosen mode's are used.
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import cross_entropy, tfkd_reg_kl, tfkd_self_kl
from cskd.methods.base import MethodContext, StepOutput, register_method
from cskd.methods.kd import KD, check_teacher_weights
from cskd.progress import log

MODES = ("self", "reg")


@dataclass
class TFKDParams:
    mode: str = "self"  # self: a pretrained teacher of the student's architecture; reg: the hand-designed one
    teacher: str = ""  # mode self: the run dir of a finished run (summary.json exists), as kd.teacher; reg ignores it
    teacher_weights: str = "final"  # final: its checkpoint.pt (last epoch); best: its best.pt (selected on test)
    # Reference experiments/kd_experiments/resnet18_distill/resnet18_self_teacher/params.json (ResNet-18,
    # CIFAR-100): alpha 0.95, temperature 6, multiplier 50. Other models use other values there, e.g.
    # MobileNetV2 0.95/20/1, DenseNet-121 0.9/20/50, ResNeXt-29 0.9/20/100.
    self_alpha: float = 0.95
    self_temperature: float = 6.0
    self_multiplier: float = 50.0
    # Reference experiments/base_experiments/base_resnet18/params.json (ResNet-18, CIFAR-100):
    # reg_alpha 0.1, reg_temperature 20, multiplier 100; correct_prob 0.99 is fixed in its loss.
    reg_alpha: float = 0.1
    reg_temperature: float = 20.0
    reg_multiplier: float = 100.0
    reg_correct_prob: float = 0.99


@register_method("tfkd")
class TFKD(KD):
    """KD's teacher handling (bind, state_dict, load_state_dict), used in mode self only."""

    Params = TFKDParams

    @classmethod
    def check_params(cls, params: TFKDParams) -> None:
        key = cls.name
        if params.mode not in MODES:
            raise ConfigError(f"config key '{key}.mode' must be self or reg, got {params.mode!r}; e.g. {key}.mode=self")
        check_teacher_weights(key, params)
        for mode in MODES:
            if not 0 <= getattr(params, f"{mode}_alpha") <= 1:
                raise ConfigError(f"config key '{key}.{mode}_alpha' must be in [0, 1] (the weight of the teacher's "
                                  f"term), got {getattr(params, f'{mode}_alpha')}")
            if not getattr(params, f"{mode}_temperature") > 0:
                raise ConfigError(f"config key '{key}.{mode}_temperature' must be > 0, got "
                                  f"{getattr(params, f'{mode}_temperature')}")
            if getattr(params, f"{mode}_multiplier") < 0:
                raise ConfigError(f"config key '{key}.{mode}_multiplier' must be >= 0, got "
                                  f"{getattr(params, f'{mode}_multiplier')}")
        if not 0 < params.reg_correct_prob <= 1:
            raise ConfigError(f"config key '{key}.reg_correct_prob' must be in (0, 1], got "
                              f"{params.reg_correct_prob}; e.g. {key}.reg_correct_prob=0.99")

    @classmethod
    def check_inputs(cls, params: TFKDParams) -> None:
        if params.mode == "self":
            super().check_inputs(params)

    def bind(self, ctx: MethodContext) -> None:
        if self.params.mode == "self":
            super().bind(ctx)
        elif ctx.rank == 0:
            log(f"{self.name}: mode reg, a hand-designed teacher ({self.params.reg_correct_prob} on the true class)")

    @property
    def alpha(self) -> float:
        """The chosen mode's weight of the soft term."""
        return self.params.self_alpha if self.params.mode == "self" else self.params.reg_alpha

    def soft_term(self, logits, images, labels):
        """The chosen mode's soft term of `logits`: against the self teacher's logits on `images` (what
        produced `logits`), or against the hand-designed teacher of `labels`."""
        p = self.params
        if p.mode == "self":
            return tfkd_self_kl(logits, self.teacher.logits(images), p.self_temperature, p.self_multiplier)
        return tfkd_reg_kl(logits, labels, p.reg_temperature, p.reg_multiplier, p.reg_correct_prob)

    def loss(self, model, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        ce = cross_entropy(logits, batch.labels)
        soft = self.soft_term(logits, batch.images, batch.labels)
        loss = (1 - self.alpha) * ce + self.alpha * soft  # == losses.tfkd_self_loss / tfkd_reg_loss
        return StepOutput(loss, logits, {"ce": ce.detach(), "kd": soft.detach()})

    def state_dict(self) -> dict:
        return super().state_dict() if self.params.mode == "self" else {}

    def load_state_dict(self, state: dict) -> None:
        if self.params.mode == "self":
            super().load_state_dict(state)
