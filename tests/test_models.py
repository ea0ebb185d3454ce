"""The model registry: exact parameter counts (computed from the official
classes) and the `Classifier` contract (features, stage maps, one forward for everything, channels_last)."""
import pytest
import torch
import torch.nn.functional as F

from cskd.models import MODELS, build_model
from cskd.models.pyramidnet import Bottleneck, ShakeDrop

# name -> {num_classes: parameters}. 100/200 = CIFAR-100/TinyImageNet; 200/120/67/387 = CUB-200,
# Stanford Dogs, MIT-67 and the 387-class hierarchy set; 1000 = ImageNet.
PARAM_COUNTS = {
    "small_cnn": {100: 30_196, 200: 36_696},
    "small_cnn_gn": {100: 30_196},  # GroupNorm has BatchNorm's affine parameters
    "preact_resnet18": {100: 11_217_444, 200: 11_268_744},
    "preact_resnet10": {100: 4_946_724, 200: 4_998_024},
    "densenet121_bc_cifar": {100: 7_048_548, 200: 7_151_048},
    "resnet101_cifar": {100: 42_697_380},
    "resnext29_8x64d": {100: 34_518_948},
    "pyramidnet200_a240": {100: 26_844_952},
    "pyramidnet200_a240_shakedrop": {100: 26_844_952},
    "resnet18": {200: 11_279_112, 120: 11_238_072, 67: 11_210_883, 387: 11_375_043},
    "resnet10": {200: 5_008_392, 120: 4_967_352, 67: 4_940_163},
    "densenet121": {200: 7_158_856, 120: 7_076_856, 67: 7_022_531},
    "resnet50": {1000: 25_557_032},
    "resnet101": {1000: 44_549_160},
    "resnet152": {1000: 60_192_808},
    "resnext101_32x4d": {1000: 44_177_704},
}

# Input side for the forward tests: the reference's CIFAR nets pool a fixed 4x4 window, so they take
# 32x32 only; the 224-px nets pool adaptively and are run at 64x64 to stay fast. resnet101, resnet152
# and resnext101_32x4d share resnet50's class and are only counted.
INPUT_SIZE = {
    "small_cnn": 32,
    "small_cnn_gn": 32,
    "preact_resnet18": 32,
    "preact_resnet10": 32,
    "densenet121_bc_cifar": 32,
    "resnet101_cifar": 32,
    "resnext29_8x64d": 32,
    "pyramidnet200_a240": 32,
    "pyramidnet200_a240_shakedrop": 32,
    "resnet18": 64,
    "resnet10": 64,
    "densenet121": 64,
    "resnet50": 64,
}
FIXED_32PX = ["preact_resnet18", "preact_resnet10", "densenet121_bc_cifar", "resnet101_cifar", "resnext29_8x64d",
              "pyramidnet200_a240", "pyramidnet200_a240_shakedrop"]
NUM_CLASSES = 7


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_is_covered():
    assert sorted(MODELS) == sorted(PARAM_COUNTS)
    assert set(INPUT_SIZE) <= set(MODELS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count(name):
    expected = PARAM_COUNTS[name]
    assert {c: n_params(build_model(name, c)) for c in expected} == expected


@pytest.mark.parametrize("name", sorted(INPUT_SIZE))
def test_forward_contract(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES).eval()
    x = torch.randn(2, 3, INPUT_SIZE[name], INPUT_SIZE[name])
    # Every module holding parameters must run in the forward (DDP without find_unused_parameters
    # needs it): e.g. no torchvision `fc` left beside `head`.
    called = set()
    owners = [mod for mod in model.modules() if next(mod.parameters(recurse=False), None) is not None]
    hooks = [mod.register_forward_hook(lambda mod, args, out: called.add(mod)) for mod in owners]
    with torch.no_grad():
        logits, features, maps = model(x, with_features=True, with_stages=True)
    for h in hooks:
        h.remove()
    assert [n for n, mod in model.named_modules() if mod in owners and mod not in called] == []

    assert logits.shape == (2, NUM_CLASSES)
    assert features.shape == (2, model.head.in_features)
    assert len(maps) == len(model.stage_channels) == len(model.stage_reductions)
    assert model.stage_reductions[0] == 1
    first_hw = maps[0].shape[-2:]
    for m, channels, reduction in zip(maps, model.stage_channels, model.stage_reductions):
        assert m.shape == (2, channels, first_hw[0] // reduction, first_hw[1] // reduction)

    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(model.forward_features(x), features)
        torch.testing.assert_close(model.pool(maps[-1]), features)
        torch.testing.assert_close(model.head(features), logits)
        # channels_last (the trainer's layout on GPU) must not change the result.
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FIXED_32PX)
def test_cifar_nets_refuse_other_input_sizes(name):
    model = build_model(name, NUM_CLASSES).eval()
    with pytest.raises(ValueError, match="expects 32x32 inputs"):
        model(torch.randn(1, 3, 64, 64))


def test_shakedrop_rates_grow_linearly_over_the_66_blocks():
    model = build_model("pyramidnet200_a240_shakedrop", NUM_CLASSES)
    rates = [m.p_drop for m in model.modules() if isinstance(m, ShakeDrop)]
    assert rates == pytest.approx([0.5 * (i + 1) / 66 for i in range(66)], abs=1e-12)
    assert not any(isinstance(m, ShakeDrop) for m in build_model("pyramidnet200_a240", NUM_CLASSES).modules())


def test_shakedrop_block_in_eval_scales_the_residual_branch():
    torch.manual_seed(0)
    plain, shaken = Bottleneck(8, 4, 2, None), Bottleneck(8, 4, 2, 0.3)
    shaken.load_state_dict(plain.state_dict())  # same weights: ShakeDrop has none
    for block in (plain, shaken):
        block.eval()
    x = torch.randn(2, 8, 6, 6)
    shortcut = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 0, 8))  # 8 -> 16 channels, zero-padded
    with torch.no_grad():
        torch.testing.assert_close(shaken(x) - shortcut, 0.7 * (plain(x) - shortcut))


def _shake(p_drop: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward factor, backward factor) per sample of one training-mode ShakeDrop call on ones."""
    torch.manual_seed(seed)
    x = torch.ones(n, 3, 2, 2, requires_grad=True)
    y = ShakeDrop(p_drop).train()(x)
    y.backward(torch.ones_like(y))
    for t in (y, x.grad):  # one factor per sample, shared by its channels and pixels
        assert (t == t[:, :1, :1, :1]).all()
    return y.detach()[:, 0, 0, 0], x.grad[:, 0, 0, 0]


def test_shakedrop_in_training_one_gate_per_batch_alpha_forward_beta_backward():
    kept = 0
    for seed in range(400):
        alpha, beta = _shake(0.25, 4, seed)
        if (alpha == 1).all():  # the gate kept the branch for the whole batch: identity both ways
            assert (beta == 1).all()
            kept += 1
        else:  # dropped for the whole batch: per-sample alpha in [-1, 1], an independent beta in [0, 1]
            assert (alpha.abs() <= 1).all() and (0 <= beta).all() and (beta <= 1).all()
            assert len(set(alpha.tolist())) == 4 and not torch.equal(alpha, beta)
    assert abs(kept / 400 - 0.75) < 0.07  # P(keep) = 1 - p_drop

    # The draws come from torch's global generator: the same seed, the same factors.
    assert all(torch.equal(a, b) for a, b in zip(_shake(1.0, 8, 7), _shake(1.0, 8, 7)))
    alpha, beta = _shake(1.0, 4096, 0)  # always dropped: alpha ~ U[-1, 1], beta ~ U[0, 1]
    assert alpha.min() < -0.99 and alpha.max() > 0.99 and abs(alpha.mean()) < 0.05
    assert beta.min() < 0.01 and beta.max() > 0.99 and abs(beta.mean() - 0.5) < 0.03


def test_shakedrop_keeps_the_dtype_under_bf16():
    x = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16)
    assert ShakeDrop(0.5).train()(x).dtype == torch.bfloat16
    assert ShakeDrop(0.5).eval()(x).dtype == torch.bfloat16
