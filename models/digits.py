"""digits_cnn: a small CNN trained in seconds on scikit-learn's bundled 8x8 digits.

Conv-BatchNorm-Relu-Conv-Relu-MaxPool-Flatten-Gemm-Relu-Gemm, about 40k parameters. The
BatchNormalization is exported as its own node (TrainingMode.PRESERVE on an eval-mode model,
which skips the exporter's own Conv+BN folding) so that the `fuse` pass has work to do.
Fixed split: 75/25 stratified, random_state=0; calibration from train, evaluation from test.
Input `input` float32 [N,1,8,8], pixel values / 16; output `logits` [N,10].
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import onnx

from models import zoo

SEED = 0
EPOCHS = 40
BATCH = 64


@lru_cache(maxsize=1)
def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x float32 [N,1,8,8] in 0..1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def _net():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 68), nn.ReLU(),
        nn.Linear(68, 10),
    )


def train():
    """Train the CNN (deterministic: fixed seed, one thread). Returns the eval-mode module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        x_tr, y_tr, _, _ = split()
        net = _net()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        xs, ys = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
        gen = torch.Generator().manual_seed(SEED)
        for _ in range(EPOCHS):
            net.train()
            order = torch.randperm(len(xs), generator=gen)
            for i in range(0, len(xs), BATCH):
                idx = order[i:i + BATCH]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx])
                loss.backward()
                opt.step()
        return net.eval()
    finally:
        torch.set_num_threads(threads)


def export(net) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            net, (torch.zeros(1, 1, 8, 8),), buf, dynamo=False, opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,  # keep BatchNormalization as a node
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "onnxcomp-zoo"
    proto.doc_string = "digits_cnn: small CNN trained on scikit-learn digits (models/digits.py)"
    return proto


class DigitsCNN(zoo.Entry):
    name = "digits_cnn"
    version = "1"
    description = "small CNN trained on scikit-learn's 8x8 digits (test accuracy ~0.98)"
    default_calibration = 256

    def _build(self) -> onnx.ModelProto:
        return export(train())

    def _calibration(self):
        x_tr = split()[0]
        return [{"input": x_tr[i:i + 1]} for i in range(len(x_tr))]

    def _evaluation(self):
        x_te = split()[2]
        return [{"input": x_te[i:i + 1]} for i in range(len(x_te))]

    def labels(self, n: int | None = None) -> np.ndarray:
        return split()[3][: len(self.evaluation(n))]

    def latency_feed(self):
        return {"input": split()[2][:1]}

    def evaluate(self, model_or_path, n=None):
        """{"test_acc": accuracy on the held-out test split, "agree": top-1 agreement with fp32}."""
        feeds = self.evaluation(n)
        outs = zoo.run_all(model_or_path, feeds)
        pred = np.array([int(np.argmax(next(iter(o.values())))) for o in outs])
        ref = np.array([int(np.argmax(next(iter(o.values())))) for o in self.reference_outputs(n)])
        return {"test_acc": float(np.mean(pred == self.labels(n))), "agree": float(np.mean(pred == ref))}


zoo.register(DigitsCNN.name, DigitsCNN)
