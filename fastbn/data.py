"""CIFAR-10 reader for the study, NumPy only (the NumPy MLP runs where torch is absent).

The python-format batches (``data_batch_1..5``, ``test_batch``) are read from, in order:
the ``data_dir`` argument, ``$FASTBN_DATA``, and ``../shared/data/cifar-10-batches-py`` beside the
project checkout or the working directory. If none exists and ``download=True``, the official
archive is fetched (torchvision's checksum-verified helper) into ``~/.cache/fastbn``. Nothing is
read or downloaded at import time.

Pre-processing is the original assignment's: raw 0-255 float32 minus the train set's per-pixel
mean image, NCHW. The set is held once, as uint8 (180 MB); batches are converted on the fly.
"""
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
N_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)


def _candidates(data_dir=None):
    if data_dir is not None:
        return [Path(data_dir)]
    out = []
    if os.environ.get("FASTBN_DATA"):
        out.append(Path(os.environ["FASTBN_DATA"]))
    here = Path(__file__).resolve().parent.parent  # the project checkout
    for base in (here, Path.cwd()):
        out.append(base.parent / "shared" / "data" / FOLDER)
    out.append(Path.home() / ".cache" / "fastbn" / FOLDER)
    return out


def _has_batches(folder):
    return all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES)


def find_data_dir(data_dir=None, download=False):
    """The folder holding the CIFAR-10 batches; downloads into ~/.cache/fastbn if allowed."""
    looked = []
    for cand in _candidates(data_dir):
        # accept the batches folder itself or its parent
        for folder in (cand, cand / FOLDER):
            looked.append(str(folder))
            if _has_batches(folder):
                return folder
    if data_dir is not None and not download:
        raise FileNotFoundError(
            f"CIFAR-10 batches ({', '.join(TRAIN_FILES + TEST_FILES)}) not found in {data_dir} "
            f"(looked in {', '.join(looked)}). Point --data_dir / $FASTBN_DATA at a "
            f"'{FOLDER}' folder, or allow the download of the official archive ({URL})."
        )
    if not download:
        raise FileNotFoundError(
            f"CIFAR-10 batches not found; looked in: {', '.join(looked)}. Set --data_dir or "
            f"$FASTBN_DATA to a '{FOLDER}' folder, or allow the download of {URL}."
        )
    root = Path(data_dir) if data_dir is not None else Path.home() / ".cache" / "fastbn"
    from torchvision.datasets.utils import download_and_extract_archive  # only when downloading

    download_and_extract_archive(URL, str(root), md5=MD5)
    folder = root / FOLDER
    if not _has_batches(folder):
        raise FileNotFoundError(f"the downloaded archive did not hold the CIFAR-10 batches in {folder}")
    return folder


def read_batch(path):
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) from one python-format batch file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch (truncated or corrupt?): {e}") from e
    if not isinstance(entry, dict) or "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels', got {type(entry).__name__}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise ValueError(f"{path}: expected uint8 data of shape (n, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise ValueError(f"{path}: labels outside 0..{N_CLASSES - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def one_hot(labels, n_classes=N_CLASSES):
    out = np.zeros((labels.shape[0], n_classes), dtype=np.float32)
    out[np.arange(labels.shape[0]), labels] = 1.0
    return out


class DataSet:
    """One split, held as uint8; batches come out pre-processed (float32, mean image removed).
    The order is reshuffled every epoch from a seeded generator."""

    def __init__(self, images, labels, mean_image, seed=42):
        self.images, self.labels, self.mean_image = images, labels, mean_image
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(labels))
        self._pos = 0
        self.epochs_completed = 0

    def __len__(self):
        return len(self.labels)

    def preprocess(self, images):
        return np.subtract(images, self.mean_image, dtype=np.float32)  # one pass, no uint8->float temp

    def next_batch_indices(self, batch_size):
        if batch_size > len(self):
            raise ValueError(f"batch_size {batch_size} is larger than the split ({len(self)} images)")
        if self._pos + batch_size > len(self):
            self._order = self._rng.permutation(len(self))
            self._pos = 0
            self.epochs_completed += 1
        idx = self._order[self._pos:self._pos + batch_size]
        self._pos += batch_size
        return idx

    def next_batch(self, batch_size, flatten=False, onehot=False):
        idx = self.next_batch_indices(batch_size)
        return self.batch(idx, flatten, onehot)

    def batch(self, idx, flatten=False, onehot=False):
        x = self.preprocess(self.images[idx])
        y = self.labels[idx]
        if flatten:
            x = x.reshape(len(idx), -1)
        return x, (one_hot(y) if onehot else y)

    def state(self):
        """What --resume needs to continue the same sequence of batches."""
        return {"rng": self._rng.bit_generator.state, "order": self._order.tolist(), "pos": self._pos,
                "epochs_completed": self.epochs_completed}

    def load_state(self, state):
        self._rng.bit_generator.state = state["rng"]
        self._order = np.asarray(state["order"], dtype=np.int64)
        self._pos = state["pos"]
        self.epochs_completed = state["epochs_completed"]


@dataclass
class CIFAR10:
    train: DataSet
    test: DataSet
    folder: Path


def load_cifar10(data_dir=None, seed=42, download=True):
    """Train and test splits, pre-processed as the original assignment (see module doc)."""
    folder = find_data_dir(data_dir, download=download)
    parts = [read_batch(folder / f) for f in TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read_batch(folder / TEST_FILES[0])
    mean_image = train_x.mean(axis=0, dtype=np.float64).astype(np.float32)
    return CIFAR10(DataSet(train_x, train_y, mean_image, seed), DataSet(test_x, test_y, mean_image, seed + 1), folder)
