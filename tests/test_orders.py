import numpy as np
import pytest

from cskd.orders import ClassIndex, draw_partners, epoch_order, rank_step_slices, shard, steps_per_epoch


def labels_fixture(n=1003, classes=7, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def split_steps(order, sizes, paired):
    """[(anchors, partners or None)] per step."""
    out, pos = [], 0
    for b in sizes:
        anchors = order[pos:pos + b]
        partners = order[pos + b:pos + 2 * b] if paired else None
        pos += 2 * b if paired else b
        out.append((anchors, partners))
    assert pos == len(order)
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_paired_order_labels_match_and_shards_disjoint_and_covering(world):
    labels = labels_fixture()
    all_anchors = []
    for rank in range(world):
        order, sizes = epoch_order(labels, 64, world, rank, seed=3, epoch=0, paired=True)
        for anchors, partners in split_steps(order, sizes, True):
            assert (labels[anchors] == labels[partners]).all()
            all_anchors.append(anchors)
        assert sizes[:-1] == [64 // world] * (len(sizes) - 1)  # full steps, then one short step
    anchors = np.concatenate(all_anchors)
    assert len(anchors) == len(set(anchors.tolist())) == len(labels)  # disjoint and covering


def test_layout_is_anchors_then_partners_like_the_reference():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    order, sizes = epoch_order(labels, 4, 1, 0, seed=0, epoch=0, paired=True)
    assert sizes == [4, 4] and len(order) == 16
    for anchors, partners in split_steps(order, sizes, True):
        assert (labels[anchors] == labels[partners]).all()


def test_seeded_and_differs_by_epoch_and_seed():
    labels = labels_fixture()
    a = epoch_order(labels, 64, 2, 1, seed=3, epoch=5, paired=True)[0]
    assert np.array_equal(a, epoch_order(labels, 64, 2, 1, seed=3, epoch=5, paired=True)[0])
    assert not np.array_equal(a, epoch_order(labels, 64, 2, 1, seed=3, epoch=6, paired=True)[0])
    assert not np.array_equal(a, epoch_order(labels, 64, 2, 1, seed=4, epoch=5, paired=True)[0])


def test_resume_needs_only_the_epoch_number():
    # an order is a pure function of its arguments: computing epochs 0..4 first changes nothing
    labels = labels_fixture()
    fresh = epoch_order(labels, 64, 2, 0, seed=1, epoch=5, paired=True)[0]
    for e in range(5):
        epoch_order(labels, 64, 2, 0, seed=1, epoch=e, paired=True)
    assert np.array_equal(fresh, epoch_order(labels, 64, 2, 0, seed=1, epoch=5, paired=True)[0])


def test_global_steps_do_not_depend_on_world_size():
    labels = labels_fixture(n=1024)
    single, sizes = epoch_order(labels, 64, 1, 0, seed=9, epoch=2, paired=True)
    steps_1 = split_steps(single, sizes, True)
    per_rank = [split_steps(*epoch_order(labels, 64, 4, r, seed=9, epoch=2, paired=True), True) for r in range(4)]
    for s, (anchors, partners) in enumerate(steps_1):
        assert np.array_equal(anchors, np.concatenate([per_rank[r][s][0] for r in range(4)]))
        assert np.array_equal(partners, np.concatenate([per_rank[r][s][1] for r in range(4)]))


def test_random_order_covers_each_sample_once_with_reference_epoch_length():
    labels = labels_fixture(n=1000)
    order, sizes = epoch_order(labels, 128, 1, 0, seed=0, epoch=0, paired=False)
    assert sorted(order.tolist()) == list(range(1000))
    assert len(sizes) == 8 and sizes[-1] == 1000 - 7 * 128  # ceil(N/B) steps, last one short
    paired_first = epoch_order(labels, 128, 1, 0, seed=0, epoch=0, paired=True)[0][:128]
    assert np.array_equal(order[:128], paired_first)  # CE and CS-KD runs of a seed share their anchors


def test_partners_uniform_within_class_with_self_included_by_default():
    labels = np.array([0] * 4 + [1] * 4)
    index = ClassIndex.build(labels)
    anchors = np.zeros(40000, dtype=np.int64)  # anchor 0, class 0 = {0, 1, 2, 3}
    partners = draw_partners(anchors, labels, index, np.random.default_rng(0).random(40000))
    freq = np.bincount(partners, minlength=8) / 40000
    assert freq[:4] == pytest.approx([0.25] * 4, abs=0.01) and freq[4:].sum() == 0


def test_exclude_self():
    labels = np.array([0] * 4 + [1] * 4 + [2])
    index = ClassIndex.build(labels)
    rng = np.random.default_rng(0)
    for anchor in range(9):
        anchors = np.full(3000, anchor)
        partners = draw_partners(anchors, labels, index, rng.random(3000), exclude_self=True)
        assert (labels[partners] == labels[anchor]).all()
        if anchor == 8:
            assert (partners == 8).all()  # a class of one pairs with itself
        else:
            assert anchor not in partners and len(set(partners.tolist())) == 3


def test_short_last_step_dropped_when_smaller_than_world():
    # 130 samples, batch 64, 4 ranks: 2 full steps, 2 left over < 4 ranks -> dropped
    assert steps_per_epoch(130, 64, 4) == 2
    assert steps_per_epoch(133, 64, 4) == 3  # 5 left over: split 1/1/2/1 over ranks
    sizes = [rank_step_slices(133, 64, 4, r)[-1] for r in range(4)]
    assert sum(s.stop - s.start for s in sizes) == 5 and all(s.stop > s.start for s in sizes)


def test_eval_shard_exact():
    parts = [shard(1001, 3, r) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1001))
