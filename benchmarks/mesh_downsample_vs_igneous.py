"""Meshing and segmentation downsampling: ours (viz.meshes / storage.pyramid) next to igneous on the same volume.

One synthetic ground-truth segmentation (pipeline.synthetic, seed 21) is written as a precomputed segmentation
layer and copied, so both tools start from identical bytes. Both run single-process, one task covering the whole
volume, the same settings (igneous' defaults: triangle reduction factor 100, max error 40 nm, surfaces closed
at the dataset edges):

- downsampling 2x2x1 (mode of labels): ours `storage.pyramid.build_pyramid`, igneous
  `create_downsampling_tasks(num_mips=1, factor=(2,2,1))` on a LocalTaskQueue. Output: fraction of equal voxels
  of the new scale (both take the most frequent label; ties may be broken differently).
- meshing: ours `viz.meshes.mesh_labels` + `write_legacy_meshes`, igneous `create_meshing_tasks` +
  `create_mesh_manifest_tasks`. Output: vertices, faces and surface area per segment (igneous meshes read back
  through CloudVolume).

Target: ours at least as fast (ratio igneous_s / ours_s >= 1) with equivalent output. igneous is not a project
dependency: it is pip-installed into the running environment at benchmark time (skip with --no-install); when it
cannot be installed or run, the JSON says so and only our figures are reported.

    python benchmarks/mesh_downsample_vs_igneous.py [--shape 64 256 256] [--workdir DIR]

Last stdout line: JSON with downsample {ours_s, igneous_s, speed_ratio, equal_fraction}, mesh {ours_s, igneous_s,
speed_ratio, vertices, faces, area ratios}, igneous (version or why unavailable).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIMPLIFICATION_FACTOR = 100
MAX_ERROR_NM = 40.0


def ensure_igneous(install: bool) -> tuple[object | None, str]:
    """(igneous module or None, version or reason)."""
    try:
        mod = importlib.import_module("igneous")
        return mod, getattr(mod, "__version__", "installed")
    except ImportError as exc:
        reason = f"not installed ({exc})"
    if not install:
        return None, reason
    before = installed_versions()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "igneous-pipeline"], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"pip install igneous-pipeline failed: {tail[0]}"
    # igneous pins some shared packages lower (e.g. DracoPy<2, which viz/multires_meshes.py needs at 2.x): put
    # back every package it changed; igneous' legacy meshing and downsampling do not use them
    after = installed_versions()
    changed = [f"{name}=={v}" for name, v in before.items() if after.get(name, v) != v]
    if changed:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *changed], capture_output=True,
                       text=True, timeout=900)
    if "zfpy" in after and "zfpy" not in before:
        # zfpy's version "1.0.1.post0" makes numcodecs (and so zarr) fail to import; igneous does not need it here
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "zfpy"], capture_output=True,
                       text=True, timeout=300)
    importlib.invalidate_caches()
    try:
        mod = importlib.import_module("igneous")
        return mod, getattr(mod, "__version__", "installed")
    except ImportError as exc:
        return None, f"installed but cannot import: {exc}"


def installed_versions() -> dict[str, str]:
    from importlib.metadata import distributions

    return {d.metadata["Name"].lower(): d.version for d in distributions() if d.metadata["Name"]}


def write_layer(path: Path, labels_zyx: np.ndarray, voxel_size_xyz, chunk_zyx) -> str:
    from storage.volume import create_volume

    url = f"precomputed://{path}"
    vol = create_volume(url, shape_zyx=labels_zyx.shape, dtype="uint64", voxel_size_xyz_nm=voxel_size_xyz,
                        chunk_shape_zyx=chunk_zyx, kind="segmentation", delete_existing=True)
    vol.write(vol.bounds, labels_zyx.astype(np.uint64))
    return url


def mesh_stats(meshes: dict) -> dict:
    """Per segment: vertices, faces, surface area (nm^2)."""
    out = {}
    for sid, m in meshes.items():
        v = np.asarray(m.vertices, dtype=np.float64)
        f = np.asarray(m.faces, dtype=np.int64).reshape(-1, 3)
        if len(f) == 0:
            continue
        area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()
        out[int(sid)] = (len(v), len(f), float(area))
    return out


def ours_downsample(url: str) -> tuple[float, np.ndarray]:
    from storage.pyramid import build_pyramid
    from storage.volume import open_volume

    t0 = time.perf_counter()
    (level,) = build_pyramid(open_volume(url), [(2, 2, 1)])
    seconds = time.perf_counter() - t0
    return seconds, level.read(level.bounds)


def ours_mesh(url: str, dest: Path) -> tuple[float, dict]:
    from storage.volume import open_volume
    from viz.meshes import MeshOptions, mesh_labels, write_legacy_meshes

    t0 = time.perf_counter()
    vol = open_volume(url)
    meshes = mesh_labels(vol.read(vol.bounds), vol.voxel_size, vol.voxel_offset,
                         options=MeshOptions(reduction_factor=SIMPLIFICATION_FACTOR, max_error_nm=MAX_ERROR_NM,
                                                     close=True))  # as igneous' closed_dataset_edges
    write_legacy_meshes(str(dest), meshes)
    return time.perf_counter() - t0, mesh_stats(meshes)


def igneous_downsample(layer: Path) -> tuple[float, np.ndarray]:
    import igneous.task_creation as tc
    from cloudvolume import CloudVolume
    from taskqueue import LocalTaskQueue

    path = f"file://{layer}"
    t0 = time.perf_counter()
    tq = LocalTaskQueue(parallel=1, progress=False)
    tasks = tc.create_downsampling_tasks(path, mip=0, num_mips=1, factor=(2, 2, 1), fill_missing=False)
    tq.insert(tasks)
    tq.execute(progress=False)
    seconds = time.perf_counter() - t0
    cv = CloudVolume(path, mip=1, progress=False)
    return seconds, np.asarray(cv[:, :, :])[..., 0].transpose(2, 1, 0)


def igneous_mesh(layer: Path, shape_xyz) -> tuple[float, dict]:
    import igneous.task_creation as tc
    from cloudvolume import CloudVolume
    from taskqueue import LocalTaskQueue

    path = f"file://{layer}"
    t0 = time.perf_counter()
    tq = LocalTaskQueue(parallel=1, progress=False)
    # uncompressed fragments, as ours are written (gzip would only add time on igneous' side)
    tq.insert(tc.create_meshing_tasks(path, mip=0, shape=tuple(int(v) for v in shape_xyz), simplification=True,
                                      max_simplification_error=MAX_ERROR_NM, mesh_dir="mesh_igneous",
                                      compress=None))
    tq.execute(progress=False)
    tq.insert(tc.create_mesh_manifest_tasks(path, magnitude=1))
    tq.execute(progress=False)
    seconds = time.perf_counter() - t0
    cv = CloudVolume(path, progress=False)
    ids = [int(p.name.split(":")[0]) for p in (layer / "mesh_igneous").glob("*:0")]
    meshes = cv.mesh.get(ids, fuse=False) if ids else {}
    return seconds, mesh_stats(meshes)


def compare_meshes(ours: dict, theirs: dict) -> dict:
    common = sorted(set(ours) & set(theirs))
    area_rel = [abs(ours[i][2] - theirs[i][2]) / max(theirs[i][2], 1e-9) for i in common]
    return {
        "segments_ours": len(ours), "segments_igneous": len(theirs), "segments_both": len(common),
        "vertices_ours": int(sum(v[0] for v in ours.values())), "vertices_igneous": int(sum(v[0] for v in theirs.values())),
        "faces_ours": int(sum(v[1] for v in ours.values())), "faces_igneous": int(sum(v[1] for v in theirs.values())),
        "area_ratio_total": round(sum(ours[i][2] for i in common) / max(sum(theirs[i][2] for i in common), 1e-9), 4),
        "area_rel_diff_median": round(float(np.median(area_rel)), 4) if area_rel else None,
        "area_rel_diff_p95": round(float(np.percentile(area_rel, 95)), 4) if area_rel else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs=3, type=int, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    p.add_argument("--chunk", nargs=3, type=int, default=(32, 64, 64), metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-install", action="store_true", help="do not pip install igneous-pipeline when missing")
    args = p.parse_args()

    from pipeline.synthetic import SynthParams, generate_box
    from storage.box import Box

    shape = tuple(args.shape)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mesh-ds-"))
    params = SynthParams(seed=args.seed, shape_zyx=shape)
    gt = generate_box(params, Box.from_shape(shape))["gt"]
    ours_layer, ig_layer = work / "ours" / "seg", work / "igneous" / "seg"
    url = write_layer(ours_layer, gt, params.voxel_size_xyz_nm, tuple(args.chunk))
    shutil.rmtree(ig_layer, ignore_errors=True)
    shutil.copytree(ours_layer, ig_layer)

    result: dict = {"shape_zyx": list(shape), "voxel_size_xyz_nm": list(params.voxel_size_xyz_nm),
                    "segments": int(len(np.unique(gt)) - (0 in gt))}
    ds_s, ds_ours = ours_downsample(url)
    mesh_s, mesh_ours = ours_mesh(url, work / "ours" / "meshes")
    result["downsample"] = {"ours_s": round(ds_s, 3)}
    result["mesh"] = {"ours_s": round(mesh_s, 3), "segments": len(mesh_ours),
                      "vertices": int(sum(v[0] for v in mesh_ours.values())),
                      "faces": int(sum(v[1] for v in mesh_ours.values()))}

    ig, why = ensure_igneous(not args.no_install)
    result["igneous"] = why
    if ig is not None:
        try:
            ig_ds_s, ds_ig = igneous_downsample(ig_layer)
            equal = float(np.mean(ds_ig == ds_ours)) if ds_ig.shape == ds_ours.shape else None
            result["downsample"].update(igneous_s=round(ig_ds_s, 3), speed_ratio=round(ig_ds_s / ds_s, 3),
                                        equal_fraction=None if equal is None else round(equal, 6),
                                        shape_ours=list(ds_ours.shape), shape_igneous=list(ds_ig.shape))
            ig_mesh_s, mesh_ig = igneous_mesh(ig_layer, tuple(reversed(shape)))
            result["mesh"].update(igneous_s=round(ig_mesh_s, 3), speed_ratio=round(ig_mesh_s / mesh_s, 3),
                                  **compare_meshes(mesh_ours, mesh_ig))
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, our figures still count
            result["igneous"] = f"{why}; failed to run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    d, m = result["downsample"], result["mesh"]
    print(f"downsample 2x2x1: ours {d['ours_s']:.2f} s, igneous {d.get('igneous_s', 'n/a')} s, "
          f"equal voxels {d.get('equal_fraction', 'n/a')}")
    print(f"mesh: ours {m['ours_s']:.2f} s, igneous {m.get('igneous_s', 'n/a')} s, "
          f"area ratio {m.get('area_ratio_total', 'n/a')}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
