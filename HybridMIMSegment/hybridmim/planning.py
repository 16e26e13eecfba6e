"""Plans made from the data: target spacing, patch size, pooling and intensity normalisation chosen from a
dataset's fingerprint (spacings, sizes, intensities), in the spirit of nnU-Net's experiment planner.

Why: a model trained or fine-tuned for a new structure should see that structure's data at its own resolution. A
1 mm isotropic plan applied to 7.7-10 mm thick-slice stacks upsamples them 7-10 times along the slice axis (slow,
blurry, and nothing gained); a plan made from the data keeps the thick axis, pools it only once in-plane features
are as coarse as it, and fits the patch to a memory budget. Every choice is written down with its reason, for the
model card.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from .cases import LabeledVolume, as_image, same_geometry
from .errors import HybridMIMError, InputImageError
from .geometry import Reorientation
from .networks import fixed_pooling, network_names
from .partial import UNREVIEWED
from .preprocessing import HU_AIR_BELOW, even_sample

#: Voxels in one training patch: la-cnn's 64 x 64 x 48, whose training step (2 patches) takes about 0.34 s on two
#: CPU cores in fp32. A patch of the planned shape costs about as much per voxel as long as the network pools it.
PATCH_VOXEL_BUDGET = 64 * 64 * 48
UNET_CHANNELS = [16, 32, 64, 128, 256]  # a planned UNet's channels: 4 down-sampling levels
PLANNED_POOLING = ("unet",)  # networks whose pooling per axis is planned; others pool every axis alike
MIN_FEATURE_SIZE = 4  # an axis is pooled only while it keeps at least this many voxels (nnU-Net's rule)
ANISOTROPY_RATIO = 3.0  # an axis this many times coarser than the finest is "thick" (nnU-Net's threshold)
THICK_AXIS_PERCENTILE = 10  # a thick axis takes this percentile of its spacings, not the median (nnU-Net)
MIN_PATCH = 8
MIN_COVERAGE = 0.25  # a patch smaller than this share of the median volume sees too little: coarser spacing
COARSENING_STEP = 1.05
MAX_COARSENING = 4.0  # never coarser than this times the data's own spacing (fine detail would be lost)
INTENSITY_SAMPLE = 10_000  # voxels per volume kept for the dataset's intensity statistics


@dataclass(frozen=True)
class Fingerprint:
    """What a plan is made from, per volume, in canonical (world-aligned) axis order."""

    spacings: list[tuple[float, float, float]]
    shapes: list[tuple[int, int, int]]
    intensities: np.ndarray  # a sample of foreground voxels (all voxels where there is no label), all volumes
    minimum: float  # the lowest voxel value seen anywhere (air at -1000 says CT in HU)
    modality: str | None = None

    @property
    def median_spacing(self) -> tuple[float, float, float]:
        x, y, z = np.median(np.asarray(self.spacings), axis=0)
        return float(x), float(y), float(z)

    def summary(self) -> dict[str, Any]:
        spacings, shapes = np.asarray(self.spacings), np.asarray(self.shapes)
        return {"volumes": len(self.spacings), "median_spacing_mm": _rounded(np.median(spacings, axis=0)),
                "spacing_range_mm": [_rounded(spacings.min(axis=0)), _rounded(spacings.max(axis=0))],
                "median_shape": [int(v) for v in np.median(shapes, axis=0)],
                "intensity_percentiles_0.5_50_99.5": _rounded(np.percentile(self.intensities, (0.5, 50, 99.5)))}


def fingerprint(volumes: Sequence[LabeledVolume], modality: str | None = None) -> Fingerprint:
    """Read each volume (and label) once: canonical spacing and shape, a seeded sample of its foreground
    intensities and its lowest value. A label map off its image's grid is refused here, before any planning."""
    if not volumes:
        raise HybridMIMError("A plan needs at least one volume")
    rng = np.random.default_rng(0)
    spacings, shapes, samples, minimum = [], [], [], math.inf
    for volume in volumes:
        image = as_image(volume.image)
        reorientation = Reorientation.from_direction(image.GetDirection())
        spacings.append(reorientation.spacing(image.GetSpacing()))
        x, y, z = (int(image.GetSize()[axis]) for axis in reorientation.perm)
        shapes.append((x, y, z))
        values = sitk.GetArrayViewFromImage(image).ravel()
        spread = even_sample(values)
        minimum = min(minimum, float(spread[np.isfinite(spread)].min(initial=math.inf)))
        index = rng.integers(0, values.size, INTENSITY_SAMPLE)
        if volume.label is not None:
            label = as_image(volume.label)
            if not same_geometry(image, label):
                raise InputImageError(f"The label map of '{volume.name}' does not have the geometry of its image "
                                      "(size/spacing/origin/direction differ)")
            labels = sitk.GetArrayViewFromImage(label).ravel()
            foreground = np.flatnonzero((labels > 0) & (labels != UNREVIEWED))
            if foreground.size:
                index = foreground[rng.integers(0, foreground.size, INTENSITY_SAMPLE)]
        chosen = values[np.sort(index)].astype(np.float64)
        samples.append(chosen[np.isfinite(chosen)])
    intensities = np.concatenate(samples)
    return Fingerprint(spacings, shapes, intensities if intensities.size else np.zeros(1), minimum,
                       modality or next((v.modality for v in volumes if v.modality), None))


@dataclass(frozen=True)
class Plan:
    """Preprocessing and network layout for a dataset; ``strides`` is None for networks whose pooling is fixed."""

    target_spacing: list[float]
    patch_size: list[int]
    intensity: dict[str, Any]
    strides: list[list[int]] | None
    reasons: list[str] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def apply(self, card: dict[str, Any], replace: bool = False) -> dict[str, Any]:
        """``card`` (a dict) with this plan's spacing, patch and, for the UNet, pooling. A training config's own
        normalisation and channels are kept (levels that would pool nothing are dropped when it gives no
        channels); ``replace`` (a fine-tune to a new structure) keeps the starting model's network and
        normalisation. The plan's reasons and the data's fingerprint go into ``training.plan``."""
        architecture = dict(card.get("architecture") or {"name": "unet"})
        if self.strides is not None and architecture["name"] in PLANNED_POOLING:
            args = dict(architecture.get("args", {}))
            strides = [s[0] if len(set(s)) == 1 else s for s in self.strides]
            if not replace and "channels" not in args:
                while len(strides) > 1 and strides[-1] == 1:  # a level that pools nothing only costs time
                    strides.pop()
                args = {"channels": UNET_CHANNELS[:len(strides) + 1], "num_res_units": 2, **args}
            architecture["args"] = {**args, "strides": strides}
        planned = {"target_spacing": self.target_spacing, "patch_size": self.patch_size}
        intensity = self.intensity if replace else card.get("intensity", self.intensity)
        return {**card, **planned, "intensity": intensity, "architecture": architecture,
                "training": {**card.get("training", {}), "plan": self.record()}}

    def record(self) -> dict[str, Any]:
        """What the card keeps of the plan: its reasons and the data's fingerprint."""
        return {"reasons": self.reasons, "fingerprint": self.fingerprint}


def can_plan(network: str) -> bool:
    """Whether a network's patch and pooling can be planned: its pooling is planned (UNet) or known (fixed)."""
    return network in PLANNED_POOLING or fixed_pooling(network) is not None


def plan_for_network(data: Fingerprint, architecture: dict[str, Any], voxel_budget: int = PATCH_VOXEL_BUDGET,
                     intensity: dict[str, Any] | None = None) -> Plan:
    """The plan for ``data`` and a card's ``architecture``: pooling planned per axis for the UNet (as many levels
    as its channels give), patch sides in multiples of the fixed pooling of the BasicUNet (16) and SwinUNETR (32).
    ``intensity``: a normalisation to keep (a starting model's) instead of one planned from the data."""
    name = architecture["name"]
    if not can_plan(name):
        plannable = [n for n in network_names() if can_plan(n)]
        raise HybridMIMError(f"No plan can be made for network '{name}'; plans exist for {', '.join(plannable)}")
    divisor = fixed_pooling(name)
    levels = len(architecture.get("args", {}).get("channels", UNET_CHANNELS)) - 1
    return plan_for(data, voxel_budget, divisor, levels, intensity)


def plan_for(data: Fingerprint, voxel_budget: int = PATCH_VOXEL_BUDGET, fixed_divisor: int | None = None,
             levels: int = len(UNET_CHANNELS) - 1, intensity: dict[str, Any] | None = None) -> Plan:
    """The plan for ``data``: ``fixed_divisor`` for a network that pools every axis alike, else pooling planned
    over ``levels`` down-sampling steps (``plan_for_network`` picks them for a card's network)."""
    reasons: list[str] = []
    spacing = _target_spacing(data, reasons)
    patch, strides, layout = _layout(data, spacing, voxel_budget, fixed_divisor, levels)
    planned = spacing
    while _coverage(data, planned, patch) < MIN_COVERAGE and max(planned) < MAX_COARSENING * max(spacing):
        coarsest = max(planned)  # the finer axes first (up to the thick one), then all of them
        planned = [min(s * COARSENING_STEP, coarsest) for s in planned] if min(planned) < coarsest else \
            [s * COARSENING_STEP for s in planned]
        patch, strides, layout = _layout(data, planned, voxel_budget, fixed_divisor, levels)
    if planned != spacing:
        coverage = _coverage(data, planned, patch)
        reasons.append(f"coarsened to {' x '.join(f'{s:.3g}' for s in planned)} mm so that one patch covers "
                       + (f"at least {MIN_COVERAGE:.0%}" if coverage >= MIN_COVERAGE else
                          f"{coverage:.0%} (no more than {MAX_COARSENING:g} times coarser than the data)")
                       + " of the median volume (nnU-Net's low-resolution rule; on a CPU it also keeps steps cheap)")
        spacing = planned
    reasons += layout
    if intensity is None:
        intensity = _intensity(data, reasons)
    else:
        reasons.append(f"intensity normalisation '{intensity['method']}' kept from the starting model: its weights "
                       "were learned with it")
    return Plan([round(s, 4) for s in spacing], patch, intensity, strides, reasons, data.summary())


def _layout(data: Fingerprint, spacing: Sequence[float], voxel_budget: int, fixed_divisor: int | None,
            levels: int) -> tuple[list[int], list[list[int]] | None, list[str]]:
    """Patch, pooling (None for fixed pooling) and their reasons at ``spacing``. Pooling is planned on the median
    volume, then again on the patch cut from it until the two agree, so the patch's bottleneck keeps at least
    ``MIN_FEATURE_SIZE`` voxels per pooled axis (as nnU-Net plans pooling on the patch)."""
    median_shape = _median_shape(data, spacing)
    if fixed_divisor is not None:
        patch = _patch_size(spacing, median_shape, [fixed_divisor] * 3, voxel_budget)
        return patch, None, [f"the network pools every axis alike: each patch side is a multiple of {fixed_divisor}",
                             _patch_reason(patch, spacing, median_shape, [fixed_divisor] * 3, voxel_budget)]
    strides = _strides(spacing, median_shape, levels)
    for _ in range(8):
        patch = _patch_size(spacing, median_shape, _divisors(strides), voxel_budget)
        again = _strides(spacing, patch, levels)
        if again == strides:
            break
        strides = again
    else:  # no agreement: pool as the patch allows and round its sides up to that pooling
        patch = [d * math.ceil(p / d) for p, d in zip(patch, _divisors(strides))]
    pools = [sum(level[axis] == 2 for level in strides) for axis in range(3)]
    return patch, strides, [
        f"pooling per axis {pools} over {levels} levels (strides {strides}): an axis is pooled while its voxels are "
        f"at most twice as coarse as the finest and at least {MIN_FEATURE_SIZE} remain in the patch",
        _patch_reason(patch, spacing, median_shape, _divisors(strides), voxel_budget)]


def _divisors(strides: list[list[int]]) -> list[int]:
    return [math.prod(level[axis] for level in strides) for axis in range(3)]


def _median_shape(data: Fingerprint, spacing: Sequence[float]) -> list[int]:
    scaled = np.asarray(data.shapes) * np.asarray(data.spacings) / np.asarray(spacing)
    return [max(1, round(float(v))) for v in np.median(scaled, axis=0)]


def _coverage(data: Fingerprint, spacing: Sequence[float], patch: Sequence[int]) -> float:
    """The share of the median volume one patch holds (padding beyond the volume does not count)."""
    shape = _median_shape(data, spacing)
    return math.prod(min(p, n) for p, n in zip(patch, shape)) / math.prod(shape)


def _target_spacing(data: Fingerprint, reasons: list[str]) -> list[float]:
    spacing = list(data.median_spacing)
    finest = min(spacing)
    thick = [axis for axis in range(3) if spacing[axis] > ANISOTROPY_RATIO * finest]
    for axis in thick:
        spacing[axis] = float(np.percentile([s[axis] for s in data.spacings], THICK_AXIS_PERCENTILE))
    text = " x ".join(f"{s:.3g}" for s in spacing)
    if thick:
        reasons.append(f"target spacing {text} mm: the median in-plane spacing; axis {', '.join(map(str, thick))} "
                       f"is over {ANISOTROPY_RATIO:g} times coarser (thick slices), kept at its "
                       f"{THICK_AXIS_PERCENTILE}th-percentile spacing instead of being upsampled")
    else:
        reasons.append(f"target spacing {text} mm: the median spacing of the volumes")
    return spacing


def _strides(spacing: Sequence[float], shape: Sequence[int], levels: int) -> list[list[int]]:
    """Pool an axis while its voxels are at most twice as coarse as the finest axis and it keeps at least
    ``MIN_FEATURE_SIZE`` voxels: thick axes are pooled only once the others have caught up."""
    current, size, strides = list(spacing), list(shape), []
    for _ in range(levels):
        finest = min(current)
        level = [2 if current[a] <= 2 * finest and size[a] // 2 >= MIN_FEATURE_SIZE else 1 for a in range(3)]
        strides.append(level)
        current = [c * s for c, s in zip(current, level)]
        size = [n // s for n, s in zip(size, level)]
    return strides


def _patch_size(spacing: Sequence[float], median_shape: Sequence[int], divisors: Sequence[int],
                voxel_budget: int) -> list[int]:
    """Start from the median volume (rounded up to the pooling's multiple), then shorten the axis that spans the
    most millimetres, one pooling multiple at a time, until the patch fits the budget: as close to a cube in mm as
    the budget allows, never cutting an axis that is already short."""
    patch = [max(d * math.ceil(max(n, MIN_PATCH) / d), d) for n, d in zip(median_shape, divisors)]
    while math.prod(patch) > voxel_budget:
        reducible = [a for a in range(3) if patch[a] - divisors[a] >= max(MIN_PATCH, divisors[a])]
        if not reducible:
            break
        axis = max(reducible, key=lambda a: (patch[a] * spacing[a], patch[a]))
        patch[axis] -= divisors[axis]
    return patch


def _patch_reason(patch: Sequence[int], spacing: Sequence[float], median_shape: Sequence[int],
                  divisors: Sequence[int], voxel_budget: int) -> str:
    covered = " x ".join(f"{p * s:.0f}" for p, s in zip(patch, spacing))
    fits = f"to at most {voxel_budget} voxels" if math.prod(patch) <= voxel_budget else \
        f"as far as it goes ({math.prod(patch)} voxels, over the budget of {voxel_budget})"
    return (f"patch {list(patch)} voxels ({covered} mm): the median volume at the target spacing ({median_shape}), "
            f"shortened along its longest axis (in mm) {fits}; sides are multiples of {list(divisors)}")


def _intensity(data: Fingerprint, reasons: list[str]) -> dict[str, Any]:
    """CT in Hounsfield units: a window over the foreground's 0.5-99.5 percentiles (the same for every volume, as
    HU mean the same tissue everywhere); anything else (MRI): a z-score per volume."""
    low, high = (float(v) for v in np.percentile(data.intensities, (0.5, 99.5)))
    is_ct = (data.modality or "").upper() == "CT" or (data.modality is None and data.minimum <= HU_AIR_BELOW)
    if is_ct:
        reasons.append(f"CT: intensities windowed to the foreground's 0.5-99.5 percentiles [{low:.0f}, {high:.0f}] "
                       "and scaled to [0, 1]")
        return {"method": "ct_window", "window": [round(low, 1), round(high, 1)], "percentiles": None}
    reasons.append(f"{data.modality or 'not CT'}: intensities z-scored per volume (MRI intensities have no fixed "
                   "scale)")
    return {"method": "zscore", "window": None, "percentiles": None}


def _rounded(values: Sequence[float] | np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in values]
