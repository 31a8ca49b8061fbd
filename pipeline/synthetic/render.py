"""EM appearance: labels -> uint8 image that looks like serial-section EM neuropil and fools intensity thresholds.

Dark membranes at every label boundary (with faint stretches), textured cytoplasm with dark grains, mitochondria
(dark, with cristae), vesicles (dark rings) in every bouton and behind every cleft, dark postsynaptic densities,
blur, noise, and per-section artefacts (missing, shifted, brightness jump). Everything is a pointwise function of
global position and of labels, or a filter whose support the caller's padding (`render_pad_voxels`) covers.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
from scipy.special import ndtri

from pipeline.synthetic.noise import _mix_arr, hash_key, hash_uniform, smooth_noise, white_noise
from pipeline.synthetic.params import SynthParams
from pipeline.synthetic.synapses import Synapse

K_FINE, K_COARSE, K_WEAK, K_GRAIN, K_NOISE, K_SECTION, K_SEGTONE = 101, 102, 103, 104, 105, 106, 107
VESICLE_R_NM = 19.0


def _blur_sigma(params: SynthParams) -> tuple[float, ...]:
    return tuple(max(0.3, params.blur_nm / v) for v in params.voxel_size_zyx)


def render_pad_voxels(params: SynthParams) -> tuple[int, int, int]:
    sig = _blur_sigma(params)
    pad = [int(4.0 * s + 0.5) + 2 for s in sig]
    pad[1] += params.max_shift_voxels
    pad[2] += params.max_shift_voxels
    return tuple(pad)  # type: ignore[return-value]


def _centres(start, shape, vs):
    return [((np.arange(a, a + n) + 0.5) * v) for a, n, v in zip(start, shape, vs)]


def _local_box(lo_nm, hi_nm, start, shape, vs):
    lo = np.maximum(np.floor(np.asarray(lo_nm) / vs).astype(np.int64) - start, 0)
    hi = np.minimum(np.ceil(np.asarray(hi_nm) / vs).astype(np.int64) + 1 - start, shape)
    if np.any(hi <= lo):
        return None
    return lo, hi


def _sub_centres(lo, hi, start, vs):
    c = [((np.arange(a, b) + s + 0.5) * v) for a, b, s, v in zip(lo, hi, start, vs)]
    return c[0][:, None, None], c[1][None, :, None], c[2][None, None, :]


PSD_MARGIN_NM = 70.0   # rendering looks this far beyond a cleft's radius
PSD_DEPTH_NM = 48.0    # the postsynaptic density's thickness behind the cleft


def cleft_frame(s: Synapse, start, shape, vs, margin_nm: float):
    """The voxels of the box [start, start + shape) within the cleft radius + `margin_nm` of a synapse's centre, as
    (slices, a, radial): a = signed distance along the normal (nm, positive on the post side), radial = distance
    from the normal axis (nm). None when none is in the box. Rendering and the apposition check share it."""
    r_out = s.radius_nm + margin_nm
    lb = _local_box(s.cleft_nm - r_out, s.cleft_nm + r_out, start, shape, vs)
    if lb is None:
        return None
    lo, hi = lb
    z, y, x = _sub_centres(lo, hi, start, vs)
    rz, ry, rx = z - s.cleft_nm[0], y - s.cleft_nm[1], x - s.cleft_nm[2]
    a = rz * s.normal[0] + ry * s.normal[1] + rx * s.normal[2]
    radial = np.sqrt(np.maximum(rz ** 2 + ry ** 2 + rx ** 2 - a ** 2, 0))
    return tuple(slice(a_, b_) for a_, b_ in zip(lo, hi)), a, radial


def cleft_slab(s: Synapse, a: np.ndarray, radial: np.ndarray, lab: np.ndarray, params: SynthParams) -> np.ndarray:
    """The cleft label: the disc's slab (half thickness + half a voxel) where it lies in either partner."""
    vs = np.array(params.voxel_size_zyx)
    return (radial < s.radius_nm) & (np.abs(a) < params.cleft_half_thickness_nm + 0.5 * vs.min()) & (
        (lab == s.post_segment_id) | (lab == s.pre_segment_id))


def render(params: SynthParams, start, shape, labels: np.ndarray, mitos, ves_pos: np.ndarray, ves_host: np.ndarray,
           synapses: list[Synapse], nuclei=()) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8, clefts uint64) for the box [start, start + shape) given its labels. Caller crops the padding."""
    seed = params.seed
    vs = np.array(params.voxel_size_zyx)
    start = np.asarray(start, np.int64)
    shape = np.asarray(shape, np.int64)
    tshape = tuple(int(s) for s in shape)
    tstart = tuple(int(s) for s in start)
    cell = labels != 0

    # --- cytoplasm and extracellular space -----------------------------------------------------------
    img = np.where(cell, np.float32(params.cytoplasm_level), np.float32(params.ecs_level))
    fine = smooth_noise(seed, K_FINE, tstart, tshape, tuple(max(0.3, 9.0 / v) for v in vs))
    coarse_step = tuple(1 if v > 30 else 3 for v in vs)
    coarse = smooth_noise(seed, K_COARSE, tstart, tshape, tuple(max(0.3, 45.0 / v) for v in vs), coarse_step)
    img += np.float32(params.texture_amplitude) * (0.55 * fine + 0.55 * coarse) * np.where(cell, 1.0, 0.5).astype(np.float32)
    # a faint per-segment tone (same spread for every cell type: types differ by shape, not brightness)
    with np.errstate(over="ignore"):
        h = _mix_arr(labels ^ np.uint64(hash_key(seed, K_SEGTONE)))
    tone = ((h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24)) - np.float32(0.5)) * np.float32(14.0)
    img += np.where(cell, tone, np.float32(0.0))
    zz, yy, xx = (np.arange(a, a + n, dtype=np.int64) for a, n in zip(tstart, tshape))
    grain = hash_uniform(seed, K_GRAIN, zz[:, None, None], yy[None, :, None], xx[None, None, :])
    img[(grain > 0.9965) & cell] -= 55.0

    # --- nuclei of somata: lighter, clumped chromatin, dark double envelope -----------------------------
    for centre, radius, host in nuclei:
        lb = _local_box(centre - radius - 20.0, centre + radius + 20.0, start, shape, vs)
        if lb is None:
            continue
        lo, hi = lb
        z, y, x = _sub_centres(lo, hi, start, vs)
        d = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
        sl = tuple(slice(a_, b_) for a_, b_ in zip(lo, hi))
        mine = labels[sl] == host
        sub = img[sl]
        chrom = coarse[sl]
        inside = mine & (d < radius)
        sub[inside] += np.float32(12.0) + np.float32(10.0) * chrom[inside]
        env = mine & (np.abs(d - radius) < 14.0)
        sub[env] -= np.float32(55.0)

    # --- mitochondria ------------------------------------------------------------------------------
    for p0, p1, mr, host in mitos:
        lb = _local_box(np.minimum(p0, p1) - mr, np.maximum(p0, p1) + mr, start, shape, vs)
        if lb is None:
            continue
        lo, hi = lb
        z, y, x = _sub_centres(lo, hi, start, vs)
        a = p1 - p0
        L = float(np.linalg.norm(a))
        u = a / max(L, 1e-9)
        rz, ry, rx = z - p0[0], y - p0[1], x - p0[2]
        t = np.clip(rz * u[0] + ry * u[1] + rx * u[2], 0, L)
        d = np.sqrt((rz - t * u[0]) ** 2 + (ry - t * u[1]) ** 2 + (rx - t * u[2]) ** 2)
        sl = tuple(slice(a_, b_) for a_, b_ in zip(lo, hi))
        inside = (d < mr) & (labels[sl] == host)
        if not inside.any():
            continue
        cristae = 16.0 * np.cos(2 * np.pi * t / 48.0 + 0.3 * d / 10.0)
        val = 100.0 + cristae + np.where(d > mr - 11.0, -38.0, 0.0)
        sub = img[sl]
        sub[inside] = val[inside].astype(np.float32) + 0.4 * (sub[inside] - params.cytoplasm_level)

    # --- vesicles (dark rings) -----------------------------------------------------------------------
    if len(ves_pos):
        lo_nm = start * vs - 40.0
        hi_nm = (start + shape) * vs + 40.0
        keep = np.all((ves_pos > lo_nm) & (ves_pos < hi_nm), axis=1)
        vp, vh = ves_pos[keep], ves_host[keep]
        if len(vp):
            rad = np.ceil((VESICLE_R_NM + 6.0) / vs).astype(np.int64)
            offs = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in rad), indexing="ij"), -1).reshape(-1, 3)
            cv = np.floor(vp / vs).astype(np.int64)
            vox = cv[:, None, :] + offs[None, :, :]
            d = np.linalg.norm((vox + 0.5) * vs - vp[:, None, :], axis=2)
            rel = vox - start
            ok = np.all((rel >= 0) & (rel < shape), axis=2) & (d < VESICLE_R_NM + 6.0)
            rel, d = rel[ok], d[ok]
            host = np.broadcast_to(vh[:, None], ok.shape)[ok]
            flat = np.ravel_multi_index(rel.T, tshape)
            mine = labels.ravel()[flat] == host
            flat, d = flat[mine], d[mine]
            ring = np.abs(d - VESICLE_R_NM) < 6.5
            dark = np.zeros(img.size, np.float32)
            np.minimum.at(dark, flat[ring], -62.0)
            light = np.zeros(img.size, np.float32)
            np.maximum.at(light, flat[~ring], 10.0)
            img += (dark + light).reshape(tshape)

    # --- synapses: PSD (post), a faint presynaptic density, cleft labels ---------------------------------
    clefts = np.zeros(tshape, np.uint64)
    for s in synapses:
        frame = cleft_frame(s, start, shape, vs, PSD_MARGIN_NM)
        if frame is None:
            continue
        sl, a, radial = frame
        lab = labels[sl]
        disc = radial < s.radius_nm
        psd = disc & (lab == s.post_segment_id) & (a > -5.0) & (a < PSD_DEPTH_NM)
        pre_d = disc & (lab == s.pre_segment_id) & (a < 5.0) & (a > -22.0)
        sub = img[sl]
        sub[psd] -= 62.0
        sub[pre_d] -= 22.0
        clefts[sl][cleft_slab(s, a, radial, lab, params)] = s.synapse_id

    # --- membranes: every label boundary, with faint stretches ---------------------------------------
    # in-section boundaries are dark on both sides; where labels change between sections the membrane is oblique
    # and smears across the section: a lighter band on one side (the section below the change)
    bnd = np.zeros(tshape, np.float32)
    for ax in (1, 2):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[ax] = slice(1, None)
        b[ax] = slice(None, -1)
        diff = labels[tuple(a)] != labels[tuple(b)]
        np.maximum(bnd[tuple(a)], diff, out=bnd[tuple(a)])
        np.maximum(bnd[tuple(b)], diff, out=bnd[tuple(b)])
    zdiff = (labels[1:] != labels[:-1]).astype(np.float32) * np.float32(0.55 if vs[0] > 1.5 * vs[1] else 1.0)
    np.maximum(bnd[:-1], zdiff, out=bnd[:-1])
    bnd *= cell
    weak_step = tuple(1 if v > 30 else 4 for v in vs)
    f = smooth_noise(seed, K_WEAK, tstart, tshape, tuple(max(0.3, 160.0 / v) for v in vs), weak_step)
    thr = float(ndtri(min(max(params.weak_membrane_fraction, 1e-3), 0.999)))
    strength = 0.12 + 0.88 / (1.0 + np.exp(-4.0 * (f - thr)))
    img -= np.float32(params.membrane_darkness) * strength.astype(np.float32) * bnd

    # --- optics, sections, noise -----------------------------------------------------------------------
    img = ndi.gaussian_filter(img, _blur_sigma(params), mode="nearest", truncate=4.0)
    for k in range(tshape[0]):
        zg = tstart[0] + k
        u = hash_key(seed, K_SECTION, zg)
        u1, u2, u3, u4 = (((u >> s) & 0xFFFF) / 65536.0 for s in (0, 16, 32, 48))
        if u1 < params.missing_section_probability:
            img[k] = 30.0
        elif u1 < params.missing_section_probability + params.shifted_section_probability:
            m = params.max_shift_voxels
            dy = int(round((u2 * 2 - 1) * m)) or 1
            dx = int(round((u3 * 2 - 1) * m))
            img[k] = np.roll(img[k], (dy, dx), axis=(0, 1))
        if u4 < params.brightness_jump_probability:
            img[k] = img[k] * (0.75 + 0.5 * u3) + (u3 - 0.5) * 30.0
    img += white_noise(seed, K_NOISE, tstart, tshape) * np.float32(params.noise_sigma)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), clefts
