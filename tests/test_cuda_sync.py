"""On CUDA, a training step never waits for the device: torch's sync debug mode set to "error"
raises on any synchronising call (`.item()`, `.cpu()`, `nonzero`, a blocking copy) inside the steps.
Skipped without a GPU (CI has none); run on one with `pytest tests/test_cuda_sync.py`."""
import pytest
import torch

from cskd.augment import Transform
from cskd.batch import Batch, epoch_generator
from cskd.engine import build_engine
from cskd.methods import METHODS, MethodContext
from cskd.models import build_model
from cskd.distributed import DistEnv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
N, C, B = 512, 10, 64


@pytest.mark.parametrize("method", ["ce", "cskd", "pskd", "cutmix", "ls"])
@pytest.mark.parametrize("pipeline, jitter, lighting", [("cifar", 0.0, 0.0), ("imagenet224", 0.4, 0.1)])
def test_training_steps_do_not_sync(method, pipeline, jitter, lighting):
    device = torch.device("cuda")
    side = 32 if pipeline == "cifar" else 64
    meta = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    transform = Transform(pipeline, meta, device, True, jitter, lighting)
    images = torch.randint(0, 256, (N, side, side, 3), dtype=torch.uint8, device=device)
    labels = torch.arange(N, device=device) % C
    algo = METHODS[method](METHODS[method].Params(), C)
    torch.manual_seed(0)
    net = algo.prepare_model(build_model("small_cnn", C)).to(device, memory_format=torch.channels_last)
    env = DistEnv(0, 1, 0, device)
    algo.bind(MethodContext(device, C, N, 0, 1, 2, None, B))
    engine = build_engine(net, env, engine="ddp", zero=0, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    gen = epoch_generator(0, 0, 0, device)
    order = torch.randperm(N, device=device)

    def step(i: int) -> None:
        sel = order[i * B:(i + 1) * B]
        x = transform.train(images.index_select(0, sel), gen)
        y = labels.index_select(0, sel)
        pair = transform.train(images.index_select(0, sel.roll(1)), gen) if algo.sampling().kind != "random" else None
        batch = Batch(x, y, sel, pair, y if pair is not None else None, sel if pair is not None else None, step=i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = algo.loss(engine.model, batch)
        out.loss.backward()
        engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)

    step(0)  # first step: lazy state (momentum buffers, cuDNN plans) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, N // B):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
