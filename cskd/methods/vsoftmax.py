"""Virtual-softmax (Chen et al., NeurIPS 2018): CE over the C logits plus one virtual class.

The classifier is bias-free, W x. In training, each sample gets an extra logit ||W_y|| * ||x||
(the largest W_v x can be, with W_v = ||W_y|| x/||x||), which the true class must beat; the target
stays y. Evaluation uses the C real logits. Two known bugs of public versions are avoided:
Self-KD-Lib's `is_bias=False` never reaches the head that is used, and frechele's virtual logit
takes one batch-global norm instead of each sample's.

The virtual logit reads the head weight outside the forward, which is safe under DDP: the weight is
also used inside it, and autograd sums both contributions before the weight's gradient hook runs.
No settings: CS-KD gives none, and the method has none.
"""
from torch import nn

from cskd.batch import Batch
from cskd.losses import virtual_softmax_loss
from cskd.methods.base import Method, StepOutput, register_method


@register_method("vsoftmax")
class VirtualSoftmax(Method):
    def prepare_model(self, model: nn.Module) -> nn.Module:
        # PyTorch's default initialisation (our choice: the paper does not specify one).
        model.head = nn.Linear(model.head.in_features, self.num_classes, bias=False)
        return model

    def loss(self, model, batch: Batch) -> StepOutput:
        logits, features = model(batch.images, with_features=True)
        weight = getattr(model, "module", model).head.weight
        return StepOutput(virtual_softmax_loss(logits, features, weight, batch.labels), logits)
