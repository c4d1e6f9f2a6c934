"""The NumPy MLP's training loop (the study's defaults); reporting is the caller's."""
import time

import numpy as np

from fastbn.numpy_mlp.mlp import MLP, SGD
from fastbn.numpy_mlp.modules import CrossEntropyModule


def accuracy(probs, onehot):
    return float(np.mean(probs.argmax(axis=1) == onehot.argmax(axis=1)))


def evaluate(model, x, onehot, batch_size):
    """Accuracy over all of x, in batches of the training size (reusing the forward buffers)."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int(np.sum(model.forward(x[i:i + batch_size]).argmax(axis=1) == onehot[i:i + batch_size].argmax(axis=1)))
    return correct / len(x)


def train(data, hidden=(100,), neg_slope=0.02, learning_rate=2e-3, max_steps=1500, batch_size=200,
          eval_freq=100, seed=42, on_eval=None, progress=None):
    """Trains on data.train, evaluates on the whole data.test every eval_freq steps (and at the
    last step). Returns the history: one record per evaluation."""
    test_x, test_y = data.test.batch(np.arange(len(data.test)), flatten=True, onehot=True)
    model = MLP(test_x.shape[1], list(hidden), test_y.shape[1], neg_slope, seed=seed)
    loss_fn = CrossEntropyModule()
    optimizer = SGD(model, learning_rate)
    history, losses, accs = [], [], []
    start = time.perf_counter()
    for step in range(1, max_steps + 1):
        x, y = data.train.next_batch(batch_size, flatten=True, onehot=True)
        probs = model.forward(x)
        losses.append(loss_fn.forward(probs, y))
        accs.append(accuracy(probs, y))
        model.backward(loss_fn.backward(probs, y))
        optimizer.step()
        if progress is not None:
            progress(step, losses[-1])
        if step % eval_freq == 0 or step == max_steps:
            test_acc = evaluate(model, test_x, test_y, batch_size)
            rec = {"step": step, "train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                   "test_acc": float(test_acc), "time_s": time.perf_counter() - start}
            history.append(rec)
            losses, accs = [], []
            if on_eval is not None:
                on_eval(rec)
    return model, history
