"""Cross-entropy baseline: random order, mean CE over the batch."""
from cskd.batch import Batch
from cskd.losses import cross_entropy
from cskd.methods.base import Method, StepOutput, register_method


@register_method("ce")
class CrossEntropy(Method):
    def loss(self, model, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        return StepOutput(cross_entropy(logits, batch.labels), logits)
