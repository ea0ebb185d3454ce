"""The fused augmentation ops against the straightforward formulas they replaced: same draws, same pixels."""
import pytest
import torch
import torch.nn.functional as F

from cskd import augment as A

CPU = torch.device("cpu")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def reference_pad_crop_flip(images, padding, generator, flip):
    """Zero-pad, crop by advanced indexing, then mirror with torch.where: three passes over the batch."""
    n, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(2), out)
    return out


def reference_color_jitter(x, strength, generator):
    """All three ops computed at every position, then the applied one selected per sample."""
    n = x.shape[0]
    factors = (torch.rand(n, 3, generator=generator) * 2 - 1) * strength + 1
    factors = factors.clamp(min=0)[:, :, None, None, None]
    order = torch.rand(n, 3, generator=generator).argsort(1)
    for pos in range(3):
        for op in range(3):
            f = factors[:, op]
            if op == 0:
                target = torch.zeros_like(x[:, :1])
            elif op == 1:
                target = A._gray(x).mean((1, 2, 3), keepdim=True)
            else:
                target = A._gray(x)
            blended = (f * x + (1 - f) * target).clamp(0, 255)
            x = torch.where((order[:, pos] == op)[:, None, None, None], blended, x)
    return x


@pytest.mark.parametrize("shape, padding, flip", [((64, 32, 32, 3), 4, True), ((64, 32, 32, 3), 4, False),
                                                  ((16, 9, 13, 1), 6, True)])
def test_pad_crop_flip_is_one_gather_with_the_same_draws(shape, padding, flip):
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    g_new, g_old = gen(), gen()
    out = A.pad_crop(images, padding, g_new, flip=flip)
    assert torch.equal(out, reference_pad_crop_flip(images, padding, g_old, flip))
    assert torch.equal(torch.rand(4, generator=g_new), torch.rand(4, generator=g_old))  # same stream position


@pytest.mark.parametrize("channels_last", [False, True])
def test_cifar_train_transform_equals_pad_flip_then_float(channels_last):
    images = torch.randint(0, 256, (128, 32, 32, 3), dtype=torch.uint8)
    t = A.Transform("cifar", {}, CPU, channels_last)
    out = t.train(images, gen(3))
    crop = reference_pad_crop_flip(images, 4, gen(3), flip=True).permute(0, 3, 1, 2)
    ref = (crop.float() * t.scale).add_(t.shift)  # the float conversion and normalisation of before
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert torch.equal(out, ref) and out.dtype == torch.float32 and out.is_contiguous(memory_format=fmt)


def test_normalize_converts_uint8_after_the_layout_change():
    t = A.Transform("cifar", {}, CPU, channels_last=False)
    u8 = torch.randint(0, 256, (8, 5, 6, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # an NHWC batch as NCHW
    for x in (u8, u8.float()):
        out = t.normalize(x)
        assert torch.equal(out, (x.float() * t.scale).add_(t.shift)) and out.is_contiguous()


def test_color_jitter_blends_once_per_position_with_the_same_result():
    x = torch.rand(64, 3, 8, 8) * 255
    x[:4] = 0  # all-black samples: the contrast target is 0 too
    for strength in (0.0, 0.4, 1.5):  # 1.5: factors clamped at 0
        new = A.color_jitter(x.clone(), strength, gen(7))
        assert torch.equal(new, reference_color_jitter(x.clone(), strength, gen(7)))


def test_lighting_builds_its_constants_once_per_device_and_dtype():
    x = torch.rand(32, 3, 4, 4) * 255
    A._pca_basis.cache_clear()
    first = A.lighting(x, 0.1, gen())
    assert torch.equal(first, A.lighting(x, 0.1, gen()))
    info = A._pca_basis.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    alpha = torch.randn(32, 3, generator=gen()) * 0.1
    eigval, eigvec = torch.tensor(A.IMAGENET_EIGVAL), torch.tensor(A.IMAGENET_EIGVEC)
    assert torch.equal(first, x + 255 * ((alpha * eigval) @ eigvec.T)[:, :, None, None])
