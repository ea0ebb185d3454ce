"""cskd.sample_log (per-sample training records) and cskd.eval.feature_subset, on hand-made values."""
import json

import numpy as np
import pytest
import torch

from cskd import sample_log
from cskd.errors import RunDirError
from cskd.eval import feature_subset
from cskd.rundir import TRAIN_CORRECT, TRAIN_PROBS

# softmax rows: (0.5, 0.5) (argmax 0), (0.1192, 0.8808) and (0.8808, 0.1192): 1 / (1 + e^2) and 1 / (1 + e^-2)
LOGITS = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
LABELS = torch.tensor([0, 0, 1])


def test_recorder_rows_are_the_steps_correctness_and_probabilities():
    rec = sample_log.SampleRecorder(4, torch.device("cpu"), probabilities=True)
    for index, rows in (([2, 0], [0, 2]), ([1], [1])):  # a step of two micro-batches, in any order
        logits, labels = LOGITS[rows], LABELS[rows]
        rec.observe(torch.tensor(index), logits.argmax(1) == labels, logits, labels)
    rows = rec.end_epoch(is_main=True)
    # sample 2 got row 0 (right: argmax 0 == label 0), sample 0 row 2 (wrong), sample 1 wrong, sample 3 unseen
    assert np.unpackbits(np.frombuffer(rows[TRAIN_CORRECT], np.uint8), bitorder="little")[:4].tolist() == [0, 0, 1, 0]
    probs = np.frombuffer(rows[TRAIN_PROBS], np.float16).astype(np.float64)
    target, top = probs[:4], probs[4:]
    assert target == pytest.approx([1 - 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(2)), 0.5, 0.0], abs=1e-3)
    assert top == pytest.approx([1 / (1 + np.exp(-2)), 1 / (1 + np.exp(-2)), 0.5, 0.0], abs=1e-3)
    assert rec.rows.abs().sum() == 0  # the next epoch starts from nothing
    assert set(sample_log.SampleRecorder(4, torch.device("cpu")).end_epoch(True)) == {TRAIN_CORRECT}


def _write(run_dir, epochs, samples=10, first=0, probs=True):
    rng = np.random.default_rng(0)
    correct = rng.random((epochs, samples)) < 0.5
    target = rng.random((epochs, samples)).astype(np.float16)
    for e in range(epochs):
        rows = {TRAIN_CORRECT: np.packbits(correct[e], bitorder="little").tobytes()}
        if probs:
            rows[TRAIN_PROBS] = np.concatenate([target[e], np.ones(samples, np.float16)]).tobytes()
        sample_log.append_rows(run_dir, first + e, samples, rows)
    return correct, target


def test_files_round_trip_and_ignore_a_torn_last_row(tmp_path):
    correct, target = _write(tmp_path, 3, samples=11, first=4)
    got = sample_log.read_correct(tmp_path)
    assert got.first_epoch == 4 and got.epochs.tolist() == [4, 5, 6] and (got.rows == correct).all()
    t, m = sample_log.read_probabilities(tmp_path)
    assert (t.rows == target.astype(np.float32)).all() and (m.rows == 1).all()
    assert (tmp_path / TRAIN_CORRECT).stat().st_size == 32 + 3 * 2  # header + ceil(11 / 8) bytes per epoch
    with open(tmp_path / TRAIN_CORRECT, "ab") as f:
        f.write(b"\x01")  # a crash in the middle of an append
    assert sample_log.read_correct(tmp_path).rows.shape == (3, 11)
    assert sample_log.read_correct(tmp_path / "nothing") is None


def test_cut_to_keeps_the_epochs_before_a_resume(tmp_path):
    correct, _ = _write(tmp_path, 4)
    assert sample_log.cut_to(tmp_path, 2, 10) == []
    assert (sample_log.read_correct(tmp_path).rows == correct[:2]).all()
    assert sample_log.read_probabilities(tmp_path)[0].rows.shape == (2, 10)
    # rows missing before the checkpoint's epoch (log_per_sample was off, or the files were lost): start anew
    assert sample_log.cut_to(tmp_path, 3, 10) == [TRAIN_CORRECT, TRAIN_PROBS]
    assert sample_log.read_correct(tmp_path) is None
    _write(tmp_path, 2)
    assert sample_log.cut_to(tmp_path, 2, 12) == [TRAIN_CORRECT, TRAIN_PROBS]  # another training set


def test_a_damaged_header_is_one_line_and_is_replaced_on_resume(tmp_path):
    (tmp_path / TRAIN_CORRECT).write_bytes(b"not a cskd file at all, no header here")
    with pytest.raises(RunDirError, match=f"{TRAIN_CORRECT} is not a cskd per-sample file"):
        sample_log.read_correct(tmp_path)
    assert sample_log.cut_to(tmp_path, 1, 10) == [TRAIN_CORRECT]


def test_hard_to_learn_is_correct_in_fewer_than_half_of_the_epochs():
    correct = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)  # right 3, 1, 2, 1 times
    assert sample_log.hard_to_learn(correct).tolist() == [1, 3]  # 2 of 4 is half: not hard


def test_feature_subset_takes_evenly_spaced_classes_in_test_order():
    labels = torch.tensor([5, 0, 3, 0, 7, 5, 0, 9, 3])
    # classes 0, 3, 6 (i * 10 // 3); the first two of each, in test order
    assert feature_subset(labels, 10, classes=3, per_class=2).tolist() == [1, 2, 3, 8]
    assert feature_subset(labels, 2, classes=10, per_class=1).tolist() == [1]  # fewer classes than asked: all


def test_a_two_rank_run_records_every_sample_once(ddp_cskd_run):
    """The ranks' sums are reduced once per epoch: the bits count each epoch's train accuracy over both ranks."""
    run_dir, _ = ddp_cskd_run
    rows = sample_log.read_correct(run_dir).rows
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows.shape == (2, 4000)
    for row, line in zip(rows, lines):
        assert 100 * (1 - row.mean()) == pytest.approx(line["train"]["top1_err"], abs=1e-9)
