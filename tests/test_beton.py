"""cskd.beton reads the same tables as FFCV's own Reader, without importing FFCV."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cskd.beton import HEADER, read_beton
from conftest import REPO


def test_tables_equal_ffcvs_reader(mnist_dir):
    from cskd.dataset import import_ffcv

    import_ffcv()
    from ffcv.reader import Reader

    for split in ("train", "test"):
        path = mnist_dir / f"{split}.beton"
        ours, theirs = read_beton(path), Reader(str(path))
        assert ours.num_samples == theirs.num_samples and ours.field_names == theirs.field_names
        assert ours.metadata.dtype == theirs.metadata.dtype
        assert np.array_equal(ours.metadata, theirs.metadata)
        assert np.array_equal(ours.alloc_table, theirs.alloc_table)


def test_damaged_files_raise_value_error_naming_the_part(mnist_dir, tmp_path):
    good = (mnist_dir / "test.beton").read_bytes()
    cases = {"header": good[:10], "per-sample metadata": good[:HEADER.itemsize + 3 * 1041 + 100],
             "version": b"\x07\x00" + good[2:]}
    for what, data in cases.items():
        path = tmp_path / f"{what}.beton"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=what):
            read_beton(path)


def test_opening_a_dataset_and_the_device_loader_do_not_import_ffcv(mnist_dir):
    code = ("import sys, torch; from cskd.dataset import open_dataset; from cskd.device_loader import read_split; "
            f"read_split(open_dataset({str(mnist_dir)!r}), 'train', torch.device('cpu')); "
            "print('ffcv' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]
