import shutil

import numpy as np
import pytest
import torch

from cskd.batch import LoaderSpec, Sampling, Shard
from cskd.config import load_config
from cskd.dataset import open_dataset
from cskd.errors import ConfigError, DataError
from cskd.ffcv_loader import EvalLoader, TrainLoader
from cskd.orders import epoch_order


def make_train(info, sampling, world=1, rank=0, per_rank=64, views=1, policy="crop"):
    spec = LoaderSpec(dataset=info, batch_per_rank=per_rank, seed=7, sampling=sampling, num_views=views,
                      pipeline=policy)
    return TrainLoader(spec, shard=Shard(rank, world))


def test_paired_batches_from_ffcv(mnist_dir):
    info = open_dataset(str(mnist_dir))
    loader = make_train(info, Sampling("class_pairs"), views=2)
    batches = list(loader.epoch(3))
    assert len(batches) == len(loader) == 63  # ceil(4000 / 64)
    expected, sizes = epoch_order(info.labels["train"], 64, 1, 0, seed=7, epoch=3, paired=True)
    got = np.concatenate([np.concatenate([b.index.numpy(), b.pair_index.numpy()]) for b in batches])
    assert np.array_equal(got, expected)  # FFCV delivers exactly the order, batch by batch
    assert [len(b.labels) for b in batches] == sizes
    for b in batches:
        assert torch.equal(b.labels, b.pair_labels)
        assert torch.equal(b.labels, torch.from_numpy(info.labels["train"][b.index.numpy()]))
        assert b.images.shape == b.pair_images.shape == (len(b.labels), 3, 32, 32)
        assert b.images.dtype == torch.float32 and len(b.views) == 1 and b.views[0].shape == b.images.shape
    assert abs(batches[0].images.mean().item()) < 0.5  # crop: normalised with the dataset's (meta.json) mean/std


def test_epoch_is_reproducible_and_resumable(mnist_dir):
    info = open_dataset(str(mnist_dir))
    loader = make_train(info, Sampling("class_pairs"))
    first = [(b.index, b.pair_index, b.images) for b in loader.epoch(2)]
    other = make_train(info, Sampling("class_pairs"), policy="cifar")
    assert not torch.equal(next(iter(other.epoch(2))).images, first[0][2])  # cifar flips, crop does not
    other = make_train(info, Sampling("class_pairs"))
    list(other.epoch(0))  # a different history before epoch 2
    again = [(b.index, b.pair_index, b.images) for b in other.epoch(2)]
    for (i1, p1, x1), (i2, p2, x2) in zip(first, again, strict=True):
        assert torch.equal(i1, i2) and torch.equal(p1, p2) and torch.equal(x1, x2)  # augmentation too
    assert not torch.equal(first[0][0], next(iter(loader.epoch(3))).index)


def test_augmentation_crops_and_flips(mnist_dir):
    info = open_dataset(str(mnist_dir))
    plain = next(iter(make_train(info, Sampling(), policy="none").epoch(0))).images
    crop = next(iter(make_train(info, Sampling(), policy="crop").epoch(0))).images
    assert plain.shape == crop.shape and not torch.equal(plain, crop)
    background = plain.min()
    shifted = [(i, dy, dx) for i in range(8) for dy in range(-4, 5) for dx in range(-4, 5)
               if torch.equal(torch.roll(plain[i], (dy, dx), (1, 2))[:, 4:-4, 4:-4], crop[i][:, 4:-4, 4:-4])]
    assert len({s[0] for s in shifted}) == 8  # every crop is a translation of the original by <= 4 px
    assert background == crop.min()  # padding is black, like the digits' background


def test_two_ranks_split_the_epoch(mnist_dir):
    info = open_dataset(str(mnist_dir))
    ranks = [make_train(info, Sampling("class_pairs"), world=2, rank=r, per_rank=32) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    seen = [torch.cat([b.index for b in loader.epoch(0)]) for loader in ranks]
    assert len(set(seen[0].tolist()) & set(seen[1].tolist())) == 0
    assert len(seen[0]) + len(seen[1]) == 4000


def test_eval_loader_covers_each_sample_once(mnist_dir):
    info = open_dataset(str(mnist_dir))
    spec = LoaderSpec(dataset=info, batch_per_rank=64, eval_batch=300, pipeline="none")
    loaders = [EvalLoader(spec, shard=Shard(r, 3)) for r in range(3)]
    parts = [torch.cat([idx for _, _, idx in loader]) for loader in loaders]
    assert sorted(torch.cat(parts).tolist()) == list(range(1000))
    # A batch far beyond the split (FFCV would allocate ~12 TB for it) is one batch of the rank's block.
    huge = LoaderSpec(dataset=info, batch_per_rank=64, eval_batch=10**9, pipeline="none")
    batches = list(EvalLoader(huge, shard=Shard(1, 3)))
    assert len(batches) == 1 and torch.equal(batches[0][2], parts[1])


def test_missing_path_names_prep_command(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; prepare it with: python -m datasets_prep mnist5k --out"):
        open_dataset(str(tmp_path / "mnist5k"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no meta.json.*python -m datasets_prep NAME --out"):
        open_dataset(str(tmp_path / "empty"))


def test_truncated_beton(mnist_dir, tmp_path):
    bad = tmp_path / "mnist5k"
    shutil.copytree(mnist_dir, bad)
    data = (bad / "train.beton").read_bytes()
    (bad / "train.beton").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train.beton has \d+ bytes but meta.json records \d+: it is truncated"):
        open_dataset(str(bad))


def test_corrupt_beton(mnist_dir, tmp_path):
    bad = tmp_path / "mnist5k"
    shutil.copytree(mnist_dir, bad)
    with open(bad / "test.beton", "r+b") as f:
        f.write(b"\xff" * 64)  # clobber the header, keep the size
    with pytest.raises(DataError, match=r"test.beton is not a readable FFCV file"):
        open_dataset(str(bad))


def test_pipeline_config_and_legacy_augment_key():
    assert load_config(None, ["data.augment=crop"]).data.pipeline == "crop"  # run dirs saved before the rename
    cfg = load_config(None, ["data.pipeline=imagenet224", "data.color_jitter=0.4", "data.lighting=0.1"])
    assert (cfg.data.pipeline, cfg.data.color_jitter, cfg.data.lighting) == ("imagenet224", 0.4, 0.1)
    with pytest.raises(ConfigError, match=r"data.pipeline' must be one of cifar, tinyimagenet32, tinyimagenet64"):
        load_config(None, ["data.pipeline=imagenet"])
    with pytest.raises(ConfigError, match=r"data.loader' must be one of auto, ffcv, device"):
        load_config(None, ["data.loader=gpu"])
    with pytest.raises(ConfigError, match=r"data.color_jitter' must be >= 0"):
        load_config(None, ["data.color_jitter=-1"])
