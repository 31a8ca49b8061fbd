"""Proofreading from the viewer: merge two segments, split a segment by its fragments, undo.

Edits go to the connectome store (``Connectome.merge/split/undo``), which records who/when/what in
``edits`` and produces a new version through the fragment -> segment id map; the volumes are never
rewritten. The viewer shows the result without republishing:

- the ``segmentation`` layer (published ids) gets Neuroglancer *equivalences* joining every published
  segment whose fragments now belong to one segment, so a merge is visible at once (same colour, one
  selection, both meshes);
- the ``fragments`` layer (supervoxels) gets the id map of the current version as equivalences, so it
  shows splits as well; it is where a split is made: hover a fragment and press the split key to detach
  it from its segment (``split_fragments`` is the general form for scripts).

Key bindings (viewer-wide): ``alt+keym`` merge the two selected segments, ``alt+keyx`` split off the
fragment under the mouse, ``alt+keyz`` undo the last edit. Scripts use `ProofreadSession` without a
viewer, or the store API directly.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import networkx as nx
import numpy as np
import pandas as pd

from storage.errors import ConnectomeError

MERGE_ACTION, SPLIT_ACTION, UNDO_ACTION = "connectome-merge-selected", "connectome-split-fragment", "connectome-undo"
KEY_BINDINGS = {"alt+keym": MERGE_ACTION, "alt+keyx": SPLIT_ACTION, "alt+keyz": UNDO_ACTION}
STATUS_KEY = "proofreading"
MAX_FRAGMENT_EQUIVALENCES = 200_000  # beyond this only edited segments' fragments are grouped in the viewer


def id_map(connectome, version: int | None = None, *, fragments: Iterable[int] | None = None,
           segments: Iterable[int] | None = None) -> pd.DataFrame:
    """fragment_id -> segment_id rows visible at `version` (latest by default), optionally filtered.

    Reads the store's ``id_map`` table through its SQL helper; the query API has ``fragments(segment)`` but
    no reverse lookup yet.
    """
    from storage.store.sql import Sql

    v = connectome.version if version is None else int(version)
    q = Sql(connectome.backend.dialect)
    where = [q.visible("i", v)]
    if fragments is not None:
        where.append(q.in_list("i.fragment_id", [int(f) for f in fragments]))
    if segments is not None:
        where.append(q.in_list("i.segment_id", [int(s) for s in segments]))
    df = connectome.backend.query(
        f"SELECT i.fragment_id, i.segment_id FROM id_map i WHERE {' AND '.join(where)} ORDER BY i.fragment_id",
        q.params,
    )
    return df.astype({"fragment_id": np.int64, "segment_id": np.int64})


@dataclass
class ProofreadSession:
    """Edits against a store, keeping track of how published segment ids map to current segments.

    `published_version` is the store version the published volumes show (RUN/publish.json); a published
    segment that was never split into fragments is its own single fragment.
    """

    connectome: Any  # storage.Connectome opened writable
    published_version: int
    user: str = "viewer"

    def __post_init__(self) -> None:
        self._lock = threading.RLock()

    # -- id bookkeeping ------------------------------------------------------------------------
    def fragments_of_published(self, published_ids: Sequence[int]) -> dict[int, list[int]]:
        ids = [int(i) for i in published_ids]
        rows = id_map(self.connectome, self.published_version, segments=ids)
        out = {i: [] for i in ids}
        for f, s in zip(rows.fragment_id, rows.segment_id):
            out[int(s)].append(int(f))
        return {i: (fr or [i]) for i, fr in out.items()}

    def current_segment(self, published_id: int) -> int:
        """The segment that holds (the first fragment of) a published segment now."""
        frags = self.fragments_of_published([published_id])[int(published_id)]
        rows = id_map(self.connectome, fragments=frags[:1])
        if rows.empty:
            return int(published_id)  # never split into fragments and never edited
        return int(rows.segment_id.iloc[0])

    def segment_of_fragment(self, fragment_id: int) -> int:
        rows = id_map(self.connectome, fragments=[int(fragment_id)])
        if rows.empty:
            raise ConnectomeError(f"fragment {fragment_id} is not in the store's id map at version "
                                  f"{self.connectome.version}")
        return int(rows.segment_id.iloc[0])

    # -- edits ---------------------------------------------------------------------------------
    def merge_published(self, a: int, b: int):
        with self._lock:
            sa, sb = self.current_segment(a), self.current_segment(b)
            if sa == sb:
                raise ConnectomeError(f"segments {a} and {b} are already one segment ({sa})")
            return self.connectome.merge(sa, sb, user=self.user)

    def split_fragments(self, fragment_ids: Sequence[int]):
        """Detach `fragment_ids` (all in one segment) from the rest of their segment."""
        with self._lock:
            frags = sorted({int(f) for f in fragment_ids})
            if not frags:
                raise ConnectomeError("split: no fragments given")
            owners = {self.segment_of_fragment(f) for f in frags}
            if len(owners) != 1:
                raise ConnectomeError(f"split: fragments {frags} belong to different segments {sorted(owners)}")
            segment = owners.pop()
            rest = sorted(set(self.connectome.fragments(segment)) - set(frags))
            if not rest:
                raise ConnectomeError(f"split: segment {segment} has no fragments besides {frags}")
            return self.connectome.split(segment, frags, rest, user=self.user)

    def undo(self):
        with self._lock:
            return self.connectome.undo(user=self.user)

    # -- what the viewer should show -----------------------------------------------------------
    def published_equivalences(self, published_ids: Iterable[int]) -> list[list[int]]:
        """Groups of published ids that are one segment now (connected through shared current segments)."""
        with self._lock:
            frags = self.fragments_of_published(list(published_ids))
            all_frags = sorted({f for fs in frags.values() for f in fs})
            now = id_map(self.connectome, fragments=all_frags)
            seg_of = dict(zip(now.fragment_id.tolist(), now.segment_id.tolist()))
        graph = nx.Graph()
        for pid, fs in frags.items():
            graph.add_node(("p", pid))
            for f in fs:
                graph.add_edge(("p", pid), ("s", int(seg_of.get(f, pid))))
        groups = []
        for comp in nx.connected_components(graph):
            pids = sorted(n[1] for n in comp if n[0] == "p")
            if len(pids) > 1:
                groups.append(pids)
        return sorted(groups)

    def fragment_equivalences(self) -> list[list[int]]:
        """Fragments grouped by their current segment (edited segments only when the map is very large)."""
        with self._lock:
            rows = id_map(self.connectome)
            if len(rows) > MAX_FRAGMENT_EQUIVALENCES:
                touched: set[int] = set()
                for details in self.connectome.edits()["details"]:
                    touched.update(json.loads(details).get("segments_after", []))
                rows = rows[rows.segment_id.isin(touched)]
        groups = rows.groupby("segment_id")["fragment_id"].apply(lambda s: sorted(int(v) for v in s))
        return sorted(g for g in groups if len(g) > 1)


def _selected_segments(layer) -> list[int]:
    return sorted(int(s) for s in layer.segments)


def _hovered_id(action_state, layer_name: str) -> int | None:
    values = action_state.selected_values
    if layer_name not in values:
        return None
    value = values[layer_name].value
    if value is None:
        return None
    if hasattr(value, "key"):  # a segment under equivalences: (key = the voxel's own id, value = representative)
        return int(value.key)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class ViewerProofreader:
    """Binds a ProofreadSession to a neuroglancer Viewer: actions, key bindings, status line, refresh."""

    def __init__(self, viewer, session: ProofreadSession, *, segmentation_layer: str = "segmentation",
                 fragments_layer: str = "fragments"):
        self.viewer = viewer
        self.session = session
        self.segmentation_layer = segmentation_layer
        self.fragments_layer = fragments_layer
        self.last_result = None
        self.last_error: str | None = None
        self.done = threading.Event()  # set after each action (tests wait on it)

    def install(self) -> "ViewerProofreader":
        self.viewer.actions.add(MERGE_ACTION, self._on_merge)
        self.viewer.actions.add(SPLIT_ACTION, self._on_split)
        self.viewer.actions.add(UNDO_ACTION, self._on_undo)
        with self.viewer.config_state.txn() as s:
            for key, action in KEY_BINDINGS.items():
                s.input_event_bindings.viewer[key] = action
        self._status(f"proofreading: alt+m merge the 2 selected segments, alt+x split off the hovered fragment "
                     f"({self.fragments_layer} layer), alt+z undo; store version {self.session.connectome.version}")
        return self

    # -- viewer updates ------------------------------------------------------------------------
    def _status(self, message: str) -> None:
        with self.viewer.config_state.txn() as s:
            s.status_messages[STATUS_KEY] = message

    def refresh(self, select: Sequence[int] | None = None) -> None:
        """Re-derive both layers' equivalences from the store at its latest version."""
        with self.viewer.txn() as s:
            seg = s.layers[self.segmentation_layer] if self.segmentation_layer in s.layers else None
            frag = s.layers[self.fragments_layer] if self.fragments_layer in s.layers else None
            if seg is not None:
                published = _published_ids(seg)
                seg.equivalences = self.session.published_equivalences(published)
                if select is not None:
                    seg.segments = [int(i) for i in select]
            if frag is not None:
                frag.equivalences = self.session.fragment_equivalences()

    def _run(self, what: str, fn) -> None:
        try:
            result = fn()
        except ConnectomeError as exc:
            self.last_error = str(exc)
            self._status(f"{what} failed: {exc}")
        else:
            self.last_result, self.last_error = result, None
            self._status(f"{what}: segments {result.segments_before} -> {result.segments_after}, "
                         f"store version {result.version} (edit {result.edit_id})")
        finally:
            self.done.set()

    # -- actions -------------------------------------------------------------------------------
    def _on_merge(self, action_state) -> None:
        layer = action_state.viewer_state.layers[self.segmentation_layer]
        selected = _selected_segments(layer)
        # members of one equivalence group count once (after a merge the group shows as one segment)
        groups = self.session.published_equivalences(selected) if len(selected) > 2 else []
        rep = {m: g[0] for g in groups for m in g}
        distinct = sorted({rep.get(s, s) for s in selected})

        def merge():
            if len(distinct) != 2:
                raise ConnectomeError(f"select exactly two segments to merge (selected: {selected})")
            result = self.session.merge_published(*distinct)
            self.refresh(select=distinct)
            return result

        self._run("merge", merge)

    def _on_split(self, action_state) -> None:
        def split():
            fragment = _hovered_id(action_state, self.fragments_layer)
            if not fragment:
                raise ConnectomeError(f"hover a fragment in the '{self.fragments_layer}' layer to split it off")
            result = self.session.split_fragments([fragment])
            self.refresh()
            return result

        self._run("split", split)

    def _on_undo(self, action_state) -> None:
        def undo():
            result = self.session.undo()
            self.refresh()
            return result

        self._run("undo", undo)


def _published_ids(layer) -> list[int]:
    """Published ids the viewer currently knows about: selected segments plus existing equivalence members."""
    ids = {int(s) for s in layer.segments}
    for group in layer.equivalences.sets():
        ids.update(int(i) for i in group)
    return sorted(ids)


def attach(session, *, store: str | None = None, user: str = "viewer") -> ViewerProofreader:
    """Proofreading on a `viz.viewer.ViewerSession`: open the run's store writable and install the actions.

    The published version comes from RUN/publish.json (what the volumes show); without it, the store's
    latest version is taken to be what was published.
    """
    import os

    from storage import Connectome
    from viz.kvstore import read_json
    from viz.publish import STORE

    location = store or os.path.join(session.run, STORE)
    if not (location.startswith("postgresql://") or os.path.exists(location)):
        raise ConnectomeError(f"no connectome store at {location}: proofreading needs the run's store (--store)")
    connectome = Connectome.open(location)
    published = None
    try:
        published = read_json(session.run, "publish.json").get("version")
    except ConnectomeError:
        pass
    if published is None:
        published = connectome.version
    proofreader = ViewerProofreader(session.viewer, ProofreadSession(connectome, int(published), user=user))
    return proofreader.install()
