"""The inference canvas: one volume's segmentation state, grown object by object with the FFN.

Faithful to google/ffn's ``Canvas`` (segment_all / segment_at / update_at): thresholds are given as
probabilities and used as logits; a new object starts at a seed with ``init_activation``; the FOV moves by the
face-max policy; a step writes the model's logits over the whole FOV (NaN = never predicted -> ``pad_value`` on
input); an object is accepted where logits >= ``segment_threshold`` on still-empty voxels (first come wins,
overlaps with earlier objects recorded), if at least ``min_segment_size`` voxels; rejected seeds are marked -1.

One difference in shape, not in result: the canvas never calls the model itself. ``pending()`` returns the
objects ("floods") that need a model step and ``apply()`` takes the logits back, so an executor can batch FOVs
from many canvases into one model call. With ``max_floods=1`` a canvas is exactly the sequential reference. With
``max_floods=k`` it grows k objects at once (useful to fill a batch from one volume); commits still happen in a
fixed order, so the result is deterministic for a given seed order and k, and a seed inside an object that
another flood is currently growing waits until that flood is finished (so parallel floods rarely split an object).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ffn.model import FFNConfig, logit
from ffn.movement import FaceMaxQueue
from storage.errors import ConfigError

Pos = tuple[int, int, int]


@dataclass(frozen=True)
class InferenceOptions:
    """Canvas thresholds, as probabilities (converted to logits inside), and size rules."""

    init_activation: float = 0.95
    pad_value: float = 0.05
    move_threshold: float = 0.9
    segment_threshold: float = 0.6
    min_segment_size: int = 1000
    min_boundary_dist: tuple[int, int, int] = (1, 1, 1)  # ZYX
    movement: str = "face_max"  # or "face_components": follow every above-threshold region of a face (forks)

    @classmethod
    def from_config(cls, config: FFNConfig, **overrides) -> "InferenceOptions":
        base = dict(init_activation=config.init_activation, pad_value=config.pad_value,
                    move_threshold=config.move_threshold, segment_threshold=config.segment_threshold,
                    min_segment_size=config.min_segment_size, min_boundary_dist=config.min_boundary_dist,
                    movement=config.movement)
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise ConfigError(f"inference options: unknown field(s) {unknown}")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"inference options: {name} is a probability in (0, 1), got {v}")
        object.__setattr__(self, "min_boundary_dist", tuple(int(v) for v in self.min_boundary_dist))
        from ffn.movement import check_policy

        check_policy(self.movement, "inference options")


@dataclass(frozen=True)
class Restrictor:
    """``mask``: voxels never used as FOV centre and never labelled. ``seed_mask``: voxels never used as seeds."""

    mask: np.ndarray | None = None
    seed_mask: np.ndarray | None = None


@dataclass
class Origin:
    start_zyx: Pos
    steps: int
    seconds: float
    voxels: int


@dataclass
class Flood:
    """One object being grown: its own logit map (NaN = unvisited), movement queue and visited bbox."""

    start: Pos
    seed: np.ndarray
    queue: FaceMaxQueue
    min_pos: np.ndarray
    max_pos: np.ndarray
    steps: int = 0
    pos: Pos | None = None  # position of the pending step
    t0: float = field(default_factory=time.perf_counter)


class Canvas:
    """State of one volume. ``image`` is raw (uint8 or float); the config's mean/stddev normalise it.

    ``offset``: the canvas may be the caller's volume padded on its faces; fixed seed lists given in the caller's
    coordinates (``BlockSeeds``) are shifted by it."""

    def __init__(self, image: np.ndarray, config: FFNConfig, options: InferenceOptions | None = None, *,
                 restrictor: Restrictor | np.ndarray | None = None, seed_policy=None, max_floods: int = 1,
                 offset: tuple[int, int, int] = (0, 0, 0)):
        from ffn.seeds import make_seed_policy

        if image.ndim != 3:
            raise ConfigError(f"FFN canvas: image must be 3-D (z, y, x), got shape {image.shape}")
        self.config = config
        self.offset = tuple(int(v) for v in offset)  # where the caller's volume starts (padding before it)
        self.options = options or InferenceOptions.from_config(config)
        self.raw_image = image
        self.image = config.normalize(image)
        self.shape = tuple(int(s) for s in image.shape)
        self.fov = np.asarray(config.fov_size, dtype=np.int64)
        self.margin = self.fov // 2
        if np.any(np.asarray(self.shape) < self.fov):
            raise ConfigError(f"FFN canvas: volume {self.shape[::-1]} (XYZ) is smaller than the FOV "
                              f"{tuple(self.fov[::-1])} (XYZ)")
        if isinstance(restrictor, np.ndarray):
            restrictor = Restrictor(mask=restrictor)
        self.restrictor = restrictor or Restrictor()
        for name in ("mask", "seed_mask"):
            m = getattr(self.restrictor, name)
            if m is not None and tuple(m.shape) != self.shape:
                raise ConfigError(f"FFN canvas: restrictor {name} shape {m.shape} != image shape {self.shape}")
        self.mask = None if self.restrictor.mask is None else self.restrictor.mask.astype(bool)
        self.seed_mask = None if self.restrictor.seed_mask is None else self.restrictor.seed_mask.astype(bool)
        o = self.options
        self.t_init = np.float32(logit(o.init_activation))
        self.t_pad = np.float32(logit(o.pad_value))
        self.t_move = np.float32(logit(o.move_threshold))
        self.t_segment = np.float32(logit(o.segment_threshold))
        self.mbd = np.asarray(o.min_boundary_dist, dtype=np.int64)
        self.deltas = tuple(int(d) for d in config.deltas)

        self.segmentation = np.zeros(self.shape, dtype=np.int32)
        self.origins: dict[int, Origin] = {}
        self.overlaps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.counters: dict[str, int] = {k: 0 for k in (
            "seeds_proposed", "seeds_tried", "steps", "segments", "rejected_weak", "rejected_small",
            "skipped_near_segment", "deferred", "aborted_claimed", "steps_rejected", "voxels_overlapping")}
        self.max_floods = max(1, int(max_floods))
        self.floods: list[Flood] = []
        self._pool: list[np.ndarray] = []
        self._max_id = 0
        self._seed_iter: Iterator[Pos] = iter(make_seed_policy(seed_policy or "peaks")(self))
        self._deferred: list[Pos] = []
        self._seeds_done = False

    # ---- validity checks (reference: Canvas.is_valid_pos, MovementRestrictor) ---------------------------------
    def _inside(self, pos: Pos) -> bool:
        for p, m, s in zip(pos, self.margin, self.shape):
            if p - m < 0 or p + m >= s:
                return False
        return True

    def _valid_move(self, flood: Flood, pos: Pos) -> bool:
        if not self._inside(pos):
            return False
        if not flood.seed[pos] >= self.t_move:  # NaN counts as below
            return False
        if self.segmentation[pos] > 0:
            return False
        return self.mask is None or not self.mask[pos]

    # ---- floods -------------------------------------------------------------------------------------------------
    def _new_seed_array(self) -> np.ndarray:
        if self._pool:
            return self._pool.pop()
        return np.full(self.shape, np.nan, dtype=np.float32)

    def _claimed(self, pos: Pos) -> bool:
        """Could an active flood still reach ``pos``? (inside its visited box grown by the FOV radius)"""
        p = np.asarray(pos)
        for f in self.floods:
            if np.all(p >= f.min_pos - self.fov) and np.all(p <= f.max_pos + self.fov):
                return True
        return False

    def _next_seed(self) -> Pos | None:
        """Next usable seed in policy order; seeds inside an object another flood is growing wait their turn."""
        candidates = self._deferred
        self._deferred = []
        i = 0
        while True:
            if i < len(candidates):
                pos = candidates[i]
                i += 1
                fresh = False
            else:
                if self._seeds_done:
                    return None
                pos = next(self._seed_iter, None)
                if pos is None:
                    self._seeds_done = True
                    self._deferred.extend(candidates[i:])
                    return None
                fresh = True
                self.counters["seeds_proposed"] += 1
            if not self._inside(pos) or self.segmentation[pos] > 0:
                continue
            if self.mask is not None and self.mask[pos]:
                continue
            if self.seed_mask is not None and self.seed_mask[pos]:
                continue
            if self.floods and self._claimed(pos):
                self._deferred.append(pos)
                if fresh:
                    self.counters["deferred"] += 1
                continue
            low = np.maximum(np.asarray(pos) - self.mbd, 0)
            high = np.asarray(pos) + self.mbd + 1
            if np.any(self.segmentation[low[0]:high[0], low[1]:high[1], low[2]:high[2]] > 0):
                self.segmentation[pos] = -1
                self.counters["skipped_near_segment"] += 1
                continue
            self._deferred.extend(candidates[i:])
            return pos

    def _start_flood(self, pos: Pos) -> Flood:
        seed = self._new_seed_array()
        seed[pos] = self.t_init
        self.counters["seeds_tried"] += 1
        p = np.asarray(pos, dtype=np.int64)
        return Flood(start=pos, seed=seed, queue=FaceMaxQueue(pos, self.deltas, float(self.t_move),
                                                                 branches=self.options.movement == "face_components"),
                     min_pos=p.copy(), max_pos=p.copy())

    def _advance(self, flood: Flood) -> bool:
        """Find the flood's next step position; False when the object is finished."""
        if not flood.seed[flood.start] >= self.t_move:
            return False  # seed got too weak (reference checks this before every step)
        if self.segmentation[flood.start] > 0:
            self.counters["steps_rejected"] += flood.steps
            flood.steps = 0  # a parallel flood committed an object over our start: sequentially we would not exist
            self.counters["aborted_claimed"] += 1
            return False
        pos = flood.queue.pop(lambda p: self._valid_move(flood, p))
        flood.pos = pos
        return pos is not None

    def pending(self) -> list[Flood]:
        """Floods that need a model step now (each has ``.pos``); finishes and replaces completed ones."""
        active: list[Flood] = []
        for f in self.floods:  # commit finished floods at once, in order, so later floods see them
            if any(g.seed[f.start] >= self.t_segment for g in active):
                self._yield_to_earlier(f)
            elif self._advance(f):
                active.append(f)
            else:
                self._finish(f)
        self.floods = active
        while len(self.floods) < self.max_floods:
            pos = self._next_seed()
            if pos is None:
                break
            f = self._start_flood(pos)
            self.floods.append(f)
            if not self._advance(f):  # cannot happen for a fresh seed, but keep the invariant
                self.floods.pop()
                self._finish(f)
        return list(self.floods)

    def _yield_to_earlier(self, flood: Flood) -> None:
        """An earlier flood already covers this flood's start: both grow the same object. Sequentially this
        seed would come after that object and be skipped, so drop the flood and retry the seed later (it is
        skipped then if the earlier object was accepted over it)."""
        self.counters["aborted_claimed"] += 1
        self.counters["steps_rejected"] += flood.steps
        flood.steps = 0
        self._finish(flood)
        self._deferred.insert(0, flood.start)

    @property
    def done(self) -> bool:
        return not self.floods and self._seeds_done and not self._deferred

    def fov_input(self, flood: Flood, out: np.ndarray) -> None:
        """Write (image, seed with NaN -> pad) of the flood's pending FOV into ``out`` [z, y, x, 2]."""
        start = np.asarray(flood.pos) - self.margin
        sel = tuple(slice(s, s + f) for s, f in zip(start, self.fov))
        out[..., 0] = self.image[sel]
        seed = flood.seed[sel]
        out[..., 1] = seed
        np.copyto(out[..., 1], self.t_pad, where=np.isnan(seed))

    def apply(self, flood: Flood, logits: np.ndarray) -> None:
        """Take the model's logits [z, y, x] for the flood's pending step."""
        pos = flood.pos
        start = np.asarray(pos) - self.margin
        sel = tuple(slice(s, s + f) for s, f in zip(start, self.fov))
        flood.seed[sel] = logits
        p = np.asarray(pos)
        np.minimum(flood.min_pos, p, out=flood.min_pos)
        np.maximum(flood.max_pos, p, out=flood.max_pos)
        flood.steps += 1
        self.counters["steps"] += 1
        flood.queue.update(logits, pos)

    # ---- accept / reject (reference: the tail of segment_all) -------------------------------------------------
    def _finish(self, flood: Flood) -> None:
        lo = np.maximum(flood.min_pos - self.margin, 0)
        hi = np.minimum(flood.max_pos + self.margin + 1, self.shape)
        sel = tuple(slice(a, b) for a, b in zip(lo, hi))
        start = flood.start
        try:
            if flood.steps <= 0:
                return
            self.counters["steps_rejected"] += flood.steps  # undone below if the object is accepted
            if not flood.seed[start] >= self.t_move:
                if self.segmentation[start] == 0:
                    self.segmentation[start] = -1
                self.counters["rejected_weak"] += 1
                return
            seg = self.segmentation[sel]
            mask = flood.seed[sel] >= self.t_segment
            if self.mask is not None:
                mask &= ~self.mask[sel]
            raw = int(mask.sum())
            ids, counts = np.unique(seg[mask], return_counts=True)
            keep = ids > 0
            mask &= seg <= 0
            actual = int(mask.sum())
            if actual < self.options.min_segment_size:
                if self.segmentation[start] == 0:
                    self.segmentation[start] = -1
                self.counters["rejected_small"] += 1
                return
            self._max_id += 1
            seg[mask] = self._max_id
            self.overlaps[self._max_id] = (ids[keep], counts[keep])
            self.origins[self._max_id] = Origin(start, flood.steps, time.perf_counter() - flood.t0, actual)
            self.counters["segments"] += 1
            self.counters["steps_rejected"] -= flood.steps
            self.counters["voxels_overlapping"] += raw - actual
        finally:
            flood.seed[sel] = np.nan  # the flood only ever wrote inside this box
            self._pool.append(flood.seed)

    def labels(self) -> np.ndarray:
        """uint64 labels 1..n in commit order, 0 = background (rejected seeds included)."""
        out = self.segmentation.astype(np.uint64)
        out[self.segmentation < 0] = 0
        return out
