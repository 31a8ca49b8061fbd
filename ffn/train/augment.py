"""Training-patch augmentation applied jointly to image and labels.

Why these: an FFN must not learn the orientation of the training volume (axis permutations, reflections;
google/ffn ``train.py``), and on anisotropic serial-section data it must survive what sectioning does to the
image: a lost or blank section, a section shifted against its neighbours, brightness changing from section to
section (the missing/misaligned/grayscale augmentations of google/ffn's JAX pipeline). Geometric changes are
applied to image and labels together so every label still sits on its image voxel; intensity changes touch only
the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AXES = "zyx"


@dataclass(frozen=True)
class AugmentConfig:
    permute_axes: str = "yx"  # axes that may be swapped among themselves ("" = none, "yx", "zyx" for isotropic)
    reflect: str = "zyx"  # axes that may be flipped
    missing_section_prob: float = 0.0  # per patch: one z section replaced by the image mean (0 after normalising)
    shifted_section_prob: float = 0.0  # per patch: sections from a random z on shifted in y/x (image and labels)
    max_shift: int = 4  # voxels, for shifted sections
    brightness: float = 0.0  # per patch additive jitter amplitude (normalised units)
    contrast: float = 0.0  # per patch multiplicative jitter amplitude (1 +- contrast)
    section_brightness: float = 0.0  # per z section additive jitter amplitude

    def __post_init__(self) -> None:
        for name in ("permute_axes", "reflect"):
            value = getattr(self, name)
            if any(c not in AXES for c in value) or len(set(value)) != len(value):
                raise ValueError(f"augment.{name} must be letters of 'zyx' without repeats, got {value!r}")
        for name in ("missing_section_prob", "shifted_section_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")


def augment_patch(
    image: np.ndarray, labels: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augmented copies of a normalised float image patch and its label patch (both ZYX, same shape).

    The patch centre stays the patch centre (permutation and reflection map it onto itself), so the object to
    fill is still the one under the centre.
    """
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ")
    image, labels = np.array(image, copy=True), np.array(labels, copy=True)
    # axis permutation among the allowed axes
    if len(config.permute_axes) > 1:
        axes = [AXES.index(c) for c in config.permute_axes]
        shuffled = list(rng.permutation(axes))
        order = list(range(3))
        for a, b in zip(axes, shuffled):
            order[a] = b
        if any(image.shape[o] != image.shape[i] for i, o in enumerate(order)):
            raise ValueError(f"cannot permute axes {config.permute_axes!r} of a patch shaped {image.shape}")
        image, labels = image.transpose(order), labels.transpose(order)
    for c in config.reflect:
        if rng.random() < 0.5:
            axis = AXES.index(c)
            image, labels = np.flip(image, axis), np.flip(labels, axis)
    image, labels = np.ascontiguousarray(image), np.ascontiguousarray(labels)
    nz = image.shape[0]
    if config.shifted_section_prob and rng.random() < config.shifted_section_prob and nz > 1:
        z = int(rng.integers(1, nz))
        dy, dx = (int(v) for v in rng.integers(-config.max_shift, config.max_shift + 1, size=2))
        image[z:] = np.roll(image[z:], (dy, dx), axis=(1, 2))
        labels[z:] = np.roll(labels[z:], (dy, dx), axis=(1, 2))
    if config.missing_section_prob and rng.random() < config.missing_section_prob:
        image[int(rng.integers(nz))] = 0.0
    if config.contrast:
        image *= np.float32(1.0 + rng.uniform(-config.contrast, config.contrast))
    if config.brightness:
        image += np.float32(rng.uniform(-config.brightness, config.brightness))
    if config.section_brightness:
        image += rng.uniform(-config.section_brightness, config.section_brightness, size=(nz, 1, 1)).astype(np.float32)
    return image.astype(np.float32, copy=False), labels
