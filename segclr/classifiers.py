"""Classifiers on (aggregated) SegCLR embeddings: linear softmax and a small residual MLP, each with a
confidence (max softmax probability) and an out-of-distribution score (segclr.ood).

Why these two: the paper shows compact embeddings need only shallow models (``classification/model_def.py``:
``num_layers=0`` is a linear softmax, ``WRN_v1`` = 2 pre-activation residual blocks of width 128). Inputs are
standardised with training statistics; classes can be balanced by weighting. The linear model is fitted
exactly (L-BFGS on the L2-regularised multinomial log-likelihood: deterministic, fast, the right tool for
linear probes with 1-20 labels per class); the MLP is trained with Adam in Keras. Both predict with plain numpy
from stored arrays, so saving then loading gives identical outputs.

A classifier is a directory: ``classifier.json`` (kind, classes, settings) + ``weights.npz``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize

from segclr.ood import MahalanobisOOD
from storage.errors import ConnectomeError

KINDS = ("linear", "resmlp")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@dataclass
class Classifier:
    kind: str
    classes: list[str]
    mean: np.ndarray
    std: np.ndarray
    weights: list[np.ndarray]
    ood: MahalanobisOOD
    settings: dict[str, Any] = field(default_factory=dict)

    # ---- prediction -------------------------------------------------------------------------------------------
    def _standardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) / self.std

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = self._standardize(x)
        w = self.weights
        if self.kind == "linear":
            return h @ w[0] + w[1]
        # resmlp: Dense -> blocks of (ReLU, Dense, ReLU, Dense) + skip -> ReLU -> Dense
        h = h @ w[0] + w[1]
        nblocks = (len(w) - 4) // 4
        for b in range(nblocks):
            k = 2 + 4 * b
            r = np.maximum(h, 0) @ w[k] + w[k + 1]
            r = np.maximum(r, 0) @ w[k + 2] + w[k + 3]
            h = h + r
        return np.maximum(h, 0) @ w[-2] + w[-1]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(self.logits(x))

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (labels (N,) str, confidence (N,) = max probability, ood score (N,))."""
        p = self.predict_proba(x)
        labels = np.asarray(self.classes, dtype=object)[p.argmax(1)]
        return labels, p.max(1).astype(np.float32), self.ood.score(self._standardize(x))

    def ood_score(self, x: np.ndarray) -> np.ndarray:
        return self.ood.score(self._standardize(x))

    # ---- persistence --------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"mean": self.mean, "std": self.std, **self.ood.to_arrays()}
        arrays.update({f"w{i}": w for i, w in enumerate(self.weights)})
        np.savez(d / "weights.tmp.npz", **arrays)
        os.replace(d / "weights.tmp.npz", d / "weights.npz")
        meta = {"kind": self.kind, "classes": list(self.classes), "num_weights": len(self.weights),
                "settings": self.settings}
        (d / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Classifier":
        d = Path(directory)
        if not (d / "classifier.json").is_file() or not (d / "weights.npz").is_file():
            raise ConnectomeError(f"classifier folder {d}: needs classifier.json and weights.npz")
        meta = json.loads((d / "classifier.json").read_text())
        with np.load(d / "weights.npz") as a:
            weights = [a[f"w{i}"] for i in range(meta["num_weights"])]
            return cls(meta["kind"], meta["classes"], a["mean"], a["std"], weights, MahalanobisOOD.from_arrays(a),
                       meta.get("settings", {}))


def _class_weights(y: np.ndarray, k: int, balanced: bool) -> np.ndarray:
    counts = np.bincount(y, minlength=k).astype(np.float64)
    if not balanced:
        return np.ones(len(y))
    w = len(y) / (k * np.maximum(counts, 1))
    return w[y]


def _fit_linear(h: np.ndarray, y: np.ndarray, k: int, l2: float, sample_w: np.ndarray) -> list[np.ndarray]:
    n, d = h.shape
    onehot = np.eye(k)[y]

    def f(theta):
        w = theta[: d * k].reshape(d, k)
        b = theta[d * k:]
        z = h @ w + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = -(sample_w * (onehot * logp).sum(1)).sum() / sample_w.sum() + 0.5 * l2 * (w * w).sum()
        g = (np.exp(logp) - onehot) * sample_w[:, None] / sample_w.sum()
        return loss, np.concatenate([(h.T @ g + l2 * w).ravel(), g.sum(0)])

    res = minimize(f, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return [res.x[: d * k].reshape(d, k), res.x[d * k:]]


def _fit_resmlp(h, y, k, hidden, blocks, l2, sample_w, epochs, seed) -> list[np.ndarray]:
    import keras

    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2)
    inp = keras.Input((h.shape[1],))
    x = keras.layers.Dense(hidden, kernel_regularizer=reg)(inp)
    for _ in range(blocks):
        r = keras.layers.ReLU()(x)
        r = keras.layers.Dense(hidden, kernel_regularizer=reg)(r)
        r = keras.layers.ReLU()(r)
        r = keras.layers.Dense(hidden, kernel_regularizer=reg)(r)
        x = keras.layers.Add()([x, r])
    x = keras.layers.ReLU()(x)
    out = keras.layers.Dense(k, kernel_regularizer=reg)(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(h.astype(np.float32), y, sample_weight=sample_w.astype(np.float32), epochs=epochs,
              batch_size=min(256, len(y)), verbose=0, shuffle=True)
    ws = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            kern, bias = layer.get_weights()
            ws += [kern.astype(np.float64), bias.astype(np.float64)]
    return ws


def train_classifier(x: np.ndarray, labels: Sequence, *, kind: str = "linear", l2: float = 1e-2,
                     hidden: int = 128, blocks: int = 2, epochs: int = 200, balanced: bool = True,
                     seed: int = 0) -> Classifier:
    """Fit a classifier on features ``x`` (N, d) and string/int ``labels`` (N,)."""
    if kind not in KINDS:
        raise ConnectomeError(f"classifier kind {kind!r} is not one of {list(KINDS)}")
    x = np.asarray(x, np.float64)
    labels = np.asarray([str(v) for v in labels])
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise ConnectomeError(f"classifier training needs at least 2 classes, got {classes}")
    y = np.searchsorted(classes, labels)
    mean = x.mean(0)
    std = x.std(0)
    std[std < 1e-8] = 1.0
    h = (x - mean) / std
    sw = _class_weights(y, len(classes), balanced)
    if kind == "linear":
        weights = _fit_linear(h, y, len(classes), l2, sw)
    else:
        weights = _fit_resmlp(h, y, len(classes), hidden, blocks, l2, sw, epochs, seed)
    ood = MahalanobisOOD.fit(h, y)
    settings = {"l2": l2, "hidden": hidden, "blocks": blocks, "epochs": epochs, "balanced": balanced,
                "seed": seed, "num_train": int(len(y))}
    return Classifier(kind, classes, mean, std, weights, ood, settings)


def macro_f1(true: Sequence, pred: Sequence, classes: Sequence | None = None) -> float:
    true = np.asarray([str(v) for v in true])
    pred = np.asarray([str(v) for v in pred])
    classes = sorted(set(true.tolist())) if classes is None else [str(c) for c in classes]
    f1s = []
    for c in classes:
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))
