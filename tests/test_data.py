"""The CIFAR-10 reader on small synthetic batches in the real pickle format, and its errors."""
import pickle

import numpy as np
import pytest

from fastbn import data as D


def write_batch(path, n, seed, labels=None):
    r = np.random.default_rng(seed)
    entry = {"batch_label": "synthetic", "labels": list(labels if labels is not None else r.integers(0, 10, n)),
             "data": r.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return entry


@pytest.fixture
def cifar_dir(tmp_path):
    folder = tmp_path / D.FOLDER
    folder.mkdir()
    batches = [write_batch(folder / name, 20, i) for i, name in enumerate(D.TRAIN_FILES + D.TEST_FILES)]
    return folder, batches


def test_load_and_preprocess(cifar_dir):
    folder, batches = cifar_dir
    ds = D.load_cifar10(folder, seed=1, download=False)
    assert len(ds.train) == 100 and len(ds.test) == 20
    raw = np.concatenate([b["data"] for b in batches[:5]]).reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(ds.train.mean_image, raw.mean(0), rtol=1e-6)
    x, y = ds.test.batch(np.arange(3))
    assert x.dtype == np.float32 and x.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(x, batches[5]["data"][:3].reshape(3, 3, 32, 32) - ds.train.mean_image, rtol=1e-6)
    xf, yo = ds.test.batch(np.arange(3), flatten=True, onehot=True)
    assert xf.shape == (3, 3072) and yo.shape == (3, 10) and np.all(yo.argmax(1) == y)
    # the parent folder works too
    assert len(D.load_cifar10(folder.parent, download=False).train) == 100


def test_batches_reshuffle_per_epoch_and_are_seeded(cifar_dir):
    folder, _ = cifar_dir
    a = D.load_cifar10(folder, seed=7, download=False).train
    b = D.load_cifar10(folder, seed=7, download=False).train
    first = np.concatenate([a.next_batch_indices(25) for _ in range(4)])
    assert sorted(first.tolist()) == list(range(100))  # one epoch sees every image once
    second = np.concatenate([a.next_batch_indices(25) for _ in range(4)])
    assert a.epochs_completed == 1 and not np.array_equal(first, second)
    np.testing.assert_array_equal(first, np.concatenate([b.next_batch_indices(25) for _ in range(4)]))
    state = a.state()
    nxt = a.next_batch_indices(10)
    a.load_state(state)
    np.testing.assert_array_equal(a.next_batch_indices(10), nxt)


def test_missing_folder_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found in .*nowhere"):
        D.load_cifar10(tmp_path / "nowhere", download=False)


def test_truncated_file(cifar_dir):
    folder, _ = cifar_dir
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="data_batch_2: not a readable CIFAR-10 batch"):
        D.load_cifar10(folder, download=False)


def test_wrong_shapes_and_labels(tmp_path):
    p = tmp_path / "b"
    with open(p, "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}, f)
    with pytest.raises(ValueError, match="shape \\(n, 3072\\)"):
        D.read_batch(p)
    write_batch(p, 4, 0, labels=[0, 1, 2, 11])
    with pytest.raises(ValueError, match="labels outside"):
        D.read_batch(p)
    with open(p, "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="4 images but 2 labels"):
        D.read_batch(p)
