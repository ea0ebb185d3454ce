"""Knowledge distillation (Hinton et al., 2015) from a teacher trained by an earlier cskd run.

Loss: (1 - alpha) * CE(student, y) + alpha * T^2 * KL(p_teacher^T || p_student^T) on the anchors
(PS-KD Eq. 2, with KL for the cross-entropy: see `losses.kd_loss`). CS-KD's Table 4 distils a
DenseNet-121 teacher "pre-trained by CS-KD" into a ResNet-10; `kd.teacher` names that teacher's
finished run dir, and the teacher runs frozen, in eval mode, under no_grad (`cskd.teacher`).
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.errors import ConfigError, RunDirError
from cskd.losses import cross_entropy, kd_kl_div
from cskd.methods.base import Method, MethodContext, StepOutput, register_method
from cskd.progress import log
from cskd.teacher import Teacher, check_teacher, load_teacher


@dataclass
class KDParams:
    teacher: str = ""  # the run dir of a finished run (its summary.json exists), e.g. runs/cifar100_densenet121_cskd
    teacher_weights: str = "final"  # final: its checkpoint.pt (last epoch); best: its best.pt (selected on test)
    # T and alpha are not given by the CS-KD paper (Table 4) nor by its code.
    # T=4 is CS-KD's own temperature (reference train.py), so that kd_cskd's two KL terms share one
    # scale; alpha=0.9 puts most of the weight on the soft targets, as Hinton et al. advise.
    temperature: float = 4.0
    alpha: float = 0.9


def check_teacher_weights(name: str, params) -> None:
    """Which weights of the teacher's run dir method `name` reads (kd, kd_cskd, tfkd)."""
    if params.teacher_weights not in ("final", "best"):
        raise ConfigError(f"config key '{name}.teacher_weights' must be final or best, got "
                          f"{params.teacher_weights!r}")


@register_method("kd")
class KD(Method):
    Params = KDParams

    def __init__(self, params, num_classes: int):
        super().__init__(params, num_classes)
        self.teacher: Teacher | None = None

    @classmethod
    def check_params(cls, params: KDParams) -> None:
        check_teacher_weights(cls.name, params)
        if not params.temperature > 0:
            raise ConfigError(f"config key '{cls.name}.temperature' must be > 0, got {params.temperature}; "
                              f"e.g. {cls.name}.temperature=4")
        if not 0 <= params.alpha <= 1:
            raise ConfigError(f"config key '{cls.name}.alpha' must be in [0, 1] (the weight of the teacher's "
                              f"term), got {params.alpha}; e.g. {cls.name}.alpha=0.9")

    @classmethod
    def check_inputs(cls, params: KDParams) -> None:
        """The teacher run must exist and be finished (an empty path too is refused here, not in
        `check_params`: a grid rule may supply it per dataset, as Table 4's does)."""
        check_teacher(params.teacher, f"{cls.name}.teacher")

    def bind(self, ctx: MethodContext) -> None:
        self.teacher = load_teacher(self.params.teacher, self.params.teacher_weights, f"{self.name}.teacher",
                                    ctx.device, ctx.num_classes, ctx.classes)
        if ctx.rank == 0:
            log(f"{self.name}: {self.teacher.description}")

    def distill(self, logits, batch: Batch) -> tuple:
        """(kd loss, its terms) of the anchors' logits against the teacher's on the same images."""
        ce = cross_entropy(logits, batch.labels)
        kd = kd_kl_div(logits, self.teacher.logits(batch.images), self.params.temperature)
        alpha = self.params.alpha
        return (1 - alpha) * ce + alpha * kd, {"ce": ce.detach(), "kd": kd.detach()}  # == losses.kd_loss

    def loss(self, model, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        loss, terms = self.distill(logits, batch)
        return StepOutput(loss, logits, terms)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.path, "teacher_weights": self.teacher.which,
                "teacher_sha256": self.teacher.sha256}

    def load_state_dict(self, state: dict) -> None:
        """On resume: refuse a teacher whose weights are not those the run started with."""
        if state.get("teacher_sha256") != self.teacher.sha256:
            raise RunDirError(
                f"{self.name}.teacher={self.teacher.path}: its {self.teacher.which} weights changed since this run "
                f"started (sha256 {str(state.get('teacher_sha256'))[:12]}... then, {self.teacher.sha256[:12]}... "
                f"now); resuming would distil from another teacher: restore the teacher's weights, or pass --force "
                f"to start this run over")
