"""The model registry: exact parameter counts (computed from the official
classes) and the `Classifier` contract (features, stage maps, one forward for everything, channels_last)."""
import pytest
import torch

from cskd.models import MODELS, build_model

# name -> {num_classes: parameters}. 100/200 = CIFAR-100/TinyImageNet; 200/120/67/387 = CUB-200,
# Stanford Dogs, MIT-67 and the 387-class hierarchy set; 1000 = ImageNet.
PARAM_COUNTS = {
    "small_cnn": {100: 30_196, 200: 36_696},
    "preact_resnet18": {100: 11_217_444, 200: 11_268_744},
    "preact_resnet10": {100: 4_946_724, 200: 4_998_024},
    "densenet121_bc_cifar": {100: 7_048_548, 200: 7_151_048},
    "resnet18": {200: 11_279_112, 120: 11_238_072, 67: 11_210_883, 387: 11_375_043},
    "resnet10": {200: 5_008_392, 120: 4_967_352, 67: 4_940_163},
    "densenet121": {200: 7_158_856, 120: 7_076_856, 67: 7_022_531},
    "resnet50": {1000: 25_557_032},
    "resnet101": {1000: 44_549_160},
    "resnext101_32x4d": {1000: 44_177_704},
}

# Input side for the forward tests: the reference's CIFAR nets pool a fixed 4x4 window, so they take
# 32x32 only; the 224-px nets pool adaptively and are run at 64x64 to stay fast. resnet101 and
# resnext101_32x4d share resnet50's class and are only counted.
INPUT_SIZE = {
    "small_cnn": 32,
    "preact_resnet18": 32,
    "preact_resnet10": 32,
    "densenet121_bc_cifar": 32,
    "resnet18": 64,
    "resnet10": 64,
    "densenet121": 64,
    "resnet50": 64,
}
FIXED_32PX = ["preact_resnet18", "preact_resnet10", "densenet121_bc_cifar"]
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
