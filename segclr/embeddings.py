"""Batched inference: cutouts -> 64-d embeddings with a loaded encoder.

Why a fixed batch: the last, short batch is padded to ``batch_size`` so one traced graph serves every call
(no retracing), and the encoder runs in inference mode (BatchNorm uses its moving statistics), so a node's
embedding does not depend on which other nodes share its batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from segclr.cutouts import ScaledRegion


class Embedder:
    """A loaded encoder + its config; ``embed_cutouts`` and ``embed_nodes`` return float32 (N, d)."""

    def __init__(self, encoder, config, batch_size: int = 32):
        import tensorflow as tf

        self.encoder = encoder
        self.config = config
        self.batch_size = int(batch_size)
        self._fn = tf.function(lambda x: encoder(x, training=False), reduce_retracing=True)

    @classmethod
    def load(cls, name_or_path, batch_size: int = 32) -> "Embedder":
        from segclr.encoder import load_model

        encoder, config = load_model(name_or_path)
        return cls(encoder, config, batch_size)

    def embed_cutouts(self, cutouts: np.ndarray) -> np.ndarray:
        n = len(cutouts)
        out = np.empty((n, self.config.embedding_dim), np.float32)
        b = self.batch_size
        for i in range(0, n, b):
            chunk = np.asarray(cutouts[i:i + b], np.float32)
            k = len(chunk)
            if k < b:
                chunk = np.concatenate([chunk, np.zeros((b - k, *chunk.shape[1:]), np.float32)])
            out[i:i + k] = self._fn(chunk).numpy()[:k]
        return out

    def embed_nodes(self, region: ScaledRegion, xyz_nm: np.ndarray, segment_ids: Sequence[int]) -> np.ndarray:
        """Embeddings for nodes at ``xyz_nm`` (N, 3) of ``segment_ids`` (N,), cutouts built batch by batch."""
        xyz_nm = np.asarray(xyz_nm, np.float64).reshape(-1, 3)
        sids = np.asarray(segment_ids, np.uint64).reshape(-1)
        out = np.empty((len(xyz_nm), self.config.embedding_dim), np.float32)
        step = self.batch_size * 8
        for i in range(0, len(xyz_nm), step):
            c = region.cutouts(xyz_nm[i:i + step], sids[i:i + step], self.config.cutout_size, self.config.channels)
            out[i:i + len(c)] = self.embed_cutouts(c)
        return out
