"""`python -m cskd.export RUN_DIR --to torchvision OUT`: torchvision's model loads the file strictly and
computes our logits; every other model or method is a one-line refusal. Run dirs are fabricated
(a config.yaml and a checkpoint of an untrained net with random BatchNorm statistics), no training."""
import pytest
import torch
import torchvision
from conftest import assert_refused, run_cli

from cskd import rundir
from cskd.checkpoint import save, save_best
from cskd.config import dump_yaml, load_config
from cskd.export import TARGETS, main
from cskd.methods import build_net
from cskd.models import build_model

NUM_CLASSES = 5


def make_run(run_dir, model: str, method: str = "ce", best: bool = False) -> torch.nn.Module:
    """A run dir as the trainer leaves it (config.yaml, checkpoint.pt, optionally best.pt); the net it holds."""
    cfg = load_config(None, [f"model={model}", f"method={method}", f"out_dir={run_dir}"])
    torch.manual_seed(0)
    net = build_net(cfg, NUM_CLASSES)
    with torch.no_grad():  # BN statistics that are not 0/1, so that eval mode tests them
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    state = net.to(memory_format=torch.channels_last).state_dict()  # the GPU trainer's layout
    run_dir.mkdir(parents=True)
    (run_dir / rundir.CONFIG).write_text(dump_yaml(cfg))
    save(run_dir / rundir.CHECKPOINT, {"model": state, "epoch": 2})
    if best:
        save_best(run_dir, state, 1, {"top1_err": 50.0}, None)
    return net.to(memory_format=torch.contiguous_format).eval()


def error(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("model, which, size", [("resnet18", "final", 64), ("resnet10", "best", 64),
                                                 ("densenet121", "final", 64)])
def test_torchvision_loads_the_export_strictly_and_computes_the_same_logits(tmp_path, capsys, model, which, size):
    ours = make_run(tmp_path / "run", model, best=which == "best")
    out = tmp_path / "out" / f"{model}.pth"
    assert main([str(tmp_path / "run"), "--checkpoint", which, "--to", "torchvision", str(out)]) == 0
    printed = capsys.readouterr().out
    call = TARGETS[model].call.format(C=NUM_CLASSES)
    assert f"{model}, {NUM_CLASSES} classes, {which} weights" in printed
    assert f"epoch {3 if which == 'final' else 2}" in printed
    assert call in printed

    state = torch.load(out, weights_only=True)
    assert all(t.is_contiguous() for t in state.values())
    theirs = eval(call, {"torchvision": torchvision})  # the printed call builds the model
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x))


@pytest.mark.parametrize("model", sorted(TARGETS))
def test_every_target_has_our_weights_names_and_shapes(model):
    """The printed call for every exportable model (resnet152 and resnext101_32x4d included), on the meta device."""
    with torch.device("meta"):
        ours = build_model(model, NUM_CLASSES).state_dict()
        theirs = eval(TARGETS[model].call.format(C=NUM_CLASSES), {"torchvision": torchvision}).state_dict()
    head = TARGETS[model].head
    renamed = {(head + k[4:] if k.startswith("head.") else k): tuple(v.shape) for k, v in ours.items()}
    assert renamed == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("model", ["preact_resnet18", "small_cnn", "resnet101_cifar", "pyramidnet200_a240"])
def test_models_that_are_not_torchvision_are_refused(tmp_path, capsys, model):
    cfg = load_config(None, [f"model={model}"])
    (tmp_path / rundir.CONFIG).write_text(dump_yaml(cfg))
    assert f"model '{model}' is not a torchvision architecture" in error([tmp_path, "--to", "torchvision",
                                                                         tmp_path / "x.pth"], capsys)
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.parametrize("method, difference", [
    ("adacos", "unexpected 'head.scale', missing 'head.bias'"),  # a bias-free cosine head with its scale
    ("vsoftmax", "missing 'head.bias'"),  # a bias-free linear head
    ("byot", "unexpected 'net.conv1.weight' (+"),  # the net wrapped, beside auxiliary heads
])
def test_methods_that_change_the_network_are_refused(tmp_path, capsys, method, difference):
    net = make_run(tmp_path / "run", "resnet18", method)
    assert set(net.state_dict()) != set(build_model("resnet18", NUM_CLASSES).state_dict())
    err = error([tmp_path / "run", "--to", "torchvision", tmp_path / "x.pth"], capsys)
    assert f"method '{method}' changes resnet18's weights ({difference}" in err
    assert not (tmp_path / "x.pth").exists()


def test_bad_outputs_and_foreign_weights_are_refused(tmp_path, capsys):
    make_run(tmp_path / "run", "resnet10")
    assert "is a directory; give a file name" in error([tmp_path / "run", "--to", "torchvision", tmp_path], capsys)
    assert "is a run dir's own checkpoint.pt" in error(
        [tmp_path / "run", "--to", "torchvision", tmp_path / "run" / "checkpoint.pt"], capsys)
    assert "has no best.pt" in error([tmp_path / "run", "--checkpoint", "best", "--to", "torchvision",
                                      tmp_path / "x.pth"], capsys)

    # a config that says resnet18 beside resnet10 weights
    cfg = load_config(None, ["model=resnet18"])
    (tmp_path / "run" / rundir.CONFIG).write_text(dump_yaml(cfg))
    err = error([tmp_path / "run", "--to", "torchvision", tmp_path / "x.pth"], capsys)
    assert "do not fit resnet18 for 5 classes (missing 'layer1.1.conv1.weight' (+" in err
    assert not (tmp_path / "x.pth").exists()


def test_command_line_refusal(tmp_path):
    (tmp_path / rundir.CONFIG).write_text(dump_yaml(load_config(None, ["model=small_cnn"])))
    res = run_cli(["-m", "cskd.export", str(tmp_path), "--to", "torchvision", str(tmp_path / "x.pth")], timeout=120)
    assert_refused(res, "model 'small_cnn' is not a torchvision architecture")
