"""Label smoothing: CE against (1 - eps) * one-hot + the smoothed mass spread over the classes.

Both papers write the target as (1 - eps) * y + eps * u with u uniform [CS-KD §3.1, PS-KD §3.1],
which is PyTorch's `label_smoothing=eps`: eps/C to every class, the true one included. TF-KD and
Self-KD-Lib instead give eps/(C-1) to each wrong class and 1 - eps to the true one;
`ls.convention` picks either.
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import LS_CONVENTIONS, label_smoothing_loss
from cskd.methods.base import Method, StepOutput, register_method


@dataclass
class LSParams:
    # PS-KD §4.2 uses 0.1 on ImageNet; the CIFAR/CS-KD values are not given ("as reported in the
    # corresponding studies", PS-KD §4.1). 0.1 is also TF-KD's and Self-KD-Lib's default.
    epsilon: float = 0.1
    # uniform: eps/C to every class, the papers' formula; others: eps/(C-1) to each wrong class (TF-KD).
    convention: str = "uniform"


def check_ls_params(name: str, params: LSParams) -> None:
    """Label smoothing's keys in method `name`'s section (ls, ls_cutmix)."""
    if not 0 <= params.epsilon < 1:
        raise ConfigError(f"config key '{name}.epsilon' must be in [0, 1), got {params.epsilon}; "
                          f"e.g. {name}.epsilon=0.1")
    if params.convention not in LS_CONVENTIONS:
        raise ConfigError(f"config key '{name}.convention' must be one of {', '.join(LS_CONVENTIONS)}, "
                          f"got {params.convention!r}")


@register_method("ls")
class LabelSmoothing(Method):
    Params = LSParams

    @classmethod
    def check_params(cls, params: LSParams) -> None:
        check_ls_params(cls.name, params)

    def loss(self, model, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        loss = label_smoothing_loss(logits, batch.labels, self.params.epsilon, self.params.convention)
        return StepOutput(loss, logits)
