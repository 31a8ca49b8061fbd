"""Out-of-distribution scores for embedding classifiers: distance to the training data.

Why distance-based: a softmax is confident far from anything it was trained on; the distance of a sample to
the class-conditional Gaussians of the training embeddings (Mahalanobis with a shared, shrunk covariance;
Lee et al. 2018) grows there instead. It needs no extra training, works with the linear and MLP classifiers
alike, and is the deterministic cousin of SNGP's distance awareness that the SegCLR paper uses (Fig. 5).
Scores are reported relative to the training data's own scores (``score / median training score``) so a
value well above 1 reads as "unlike anything seen in training" whatever the feature dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MahalanobisOOD:
    means: np.ndarray  # (K, d)
    precision: np.ndarray  # (d, d)
    reference: float  # median training score, the unit of the reported score

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, shrinkage: float | None = None) -> "MahalanobisOOD":
        x = np.asarray(x, np.float64)
        y = np.asarray(y)
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        n, d = x.shape
        cov = centred.T @ centred / max(1, n - len(classes))
        # shrink towards a scaled identity: few labelled samples in 64-d need it (n < d is common here)
        alpha = float(shrinkage) if shrinkage is not None else min(1.0, d / max(1, n))
        alpha = min(max(alpha, 0.05), 1.0)
        target = np.trace(cov) / d if np.trace(cov) > 0 else 1.0
        cov = (1 - alpha) * cov + alpha * target * np.eye(d)
        precision = np.linalg.inv(cov)
        ood = cls(means, precision, 1.0)
        ood.reference = float(np.median(ood.raw_score(x))) or 1.0
        return ood

    def raw_score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        diff = x[:, None, :] - self.means[None, :, :]
        d2 = np.einsum("nkd,de,nke->nk", diff, self.precision, diff)
        return d2.min(1)

    def score(self, x: np.ndarray) -> np.ndarray:
        return (self.raw_score(x) / self.reference).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"ood_means": self.means, "ood_precision": self.precision, "ood_reference": np.array(self.reference)}

    @classmethod
    def from_arrays(cls, a) -> "MahalanobisOOD":
        return cls(np.asarray(a["ood_means"]), np.asarray(a["ood_precision"]), float(a["ood_reference"]))


def auroc(scores_in: np.ndarray, scores_out: np.ndarray) -> float:
    """Probability that an out-of-distribution sample scores higher than an in-distribution one (ties = 1/2)."""
    a = np.asarray(scores_in, np.float64)
    b = np.asarray(scores_out, np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    # average ranks for ties
    sorted_v = allv[order]
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rb = ranks[len(a):].sum()
    return float((rb - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))
