"""Maximum entropy ("confidence penalty", Pereyra et al. 2017): CE - beta * H(p).

CS-KD §3.1 lists it as a baseline that "maximizes the entropy of the predictive distribution"
[Dubey et al. 2018, Pereyra et al. 2017] without giving its weight.
H is the entropy of the softmax of each sample, averaged over the batch, like the CE.
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import cross_entropy, softmax_entropy
from cskd.methods.base import Method, StepOutput, register_method


@dataclass
class MaxEntParams:
    # Our choice: neither paper gives beta. Pereyra et al. 2017 tuned the confidence-penalty weight
    # per task; of the usual sweep {0.1, 0.5, 1, 2}, 0.1 is the
    # mildest (Self-KD-Lib's CE + 0.5 * mean(p log p) is an effective beta of only 0.5/C,
    # its mean running over classes as well). Sweep it per dataset.
    beta: float = 0.1


@register_method("maxent")
class MaxEntropy(Method):
    Params = MaxEntParams

    @classmethod
    def check_params(cls, params: MaxEntParams) -> None:
        if params.beta < 0:
            raise ConfigError(f"config key 'maxent.beta' must be >= 0, got {params.beta}")

    def loss(self, model, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        ce = cross_entropy(logits, batch.labels)
        entropy = softmax_entropy(logits)
        loss = ce - self.params.beta * entropy  # == losses.max_entropy_loss, with the terms kept for logging
        return StepOutput(loss, logits, {"ce": ce.detach(), "entropy": entropy.detach()})
