"""Output labelmaps land on the input's exact grid: oblique, permuted, flipped and anisotropic volumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from conftest import SAMPLE_IMAGE, SAMPLE_LABEL
from hybridmim.geometry import Reorientation
from hybridmim.imageio import ijk_to_lps, read_volume, write_labelmap
from hybridmim.metrics import dice_per_label


def rotation(angle_degrees: float, axis: int) -> np.ndarray:
    a = np.deg2rad(angle_degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def with_direction(image: sitk.Image, direction: np.ndarray) -> sitk.Image:
    copy = sitk.Image(image)
    copy.SetDirection(direction.flatten().tolist())
    return copy


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


@pytest.fixture(scope="module")
def sample():
    return read_volume(SAMPLE_IMAGE)


@pytest.fixture(scope="module")
def sample_labels(segmenter, sample):
    return segmenter.segment(sample)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flip", list(itertools.product((False, True), repeat=3)))
def test_reorientation_is_exactly_invertible(perm, flip):
    array = np.random.default_rng(0).random((2, 3, 4, 5))
    reorientation = Reorientation(perm, flip)
    assert np.array_equal(reorientation.invert(reorientation.apply(array)), array)


def test_reorientation_points_canonical_axes_along_world_axes():
    direction = rotation(30, 0) @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
    reorientation = Reorientation.from_direction(direction.flatten())
    canonical = direction[:, list(reorientation.perm)] * np.where(reorientation.flip, -1, 1)
    assert np.all(np.diag(canonical) > 0)
    assert list(np.argmax(np.abs(canonical), axis=0)) == [0, 1, 2]


@pytest.mark.parametrize("angle,axis", [(20, 2), (-35, 0), (40, 1)])
def test_oblique_volume_gets_same_voxels_and_its_own_geometry(segmenter, sample, sample_labels, angle, axis):
    direction = rotation(angle, axis) @ np.array(sample.GetDirection()).reshape(3, 3)
    oblique = with_direction(sample, direction)
    labels = segmenter.segment(oblique)
    assert_same_grid(labels, oblique)
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(sample_labels))


def test_permuted_and_flipped_volume_maps_back_to_the_same_voxels(segmenter, sample, sample_labels):
    """The same physical image stored with another axis order: labels agree voxel for voxel in physical space."""
    stored_differently = sitk.Flip(sitk.PermuteAxes(sample, [2, 0, 1]), [True, False, True])
    labels = segmenter.segment(stored_differently)
    assert_same_grid(labels, stored_differently)
    back = sitk.Resample(labels, sample, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(sample_labels))


def test_anisotropic_oblique_volume_round_trips_through_files(segmenter, sample, tmp_path):
    """An oblique acquisition at 0.7 x 1.0 x 2.5 mm (the sample resampled to that spacing, its grid then tilted by
    25 degrees with the anatomy, as an oblique scan is): the result is on that grid, in memory and on disk, and
    overlaps the reference resampled the same way."""
    spacing = (0.7, 1.0, 2.5)
    extent = np.array(sample.GetSize()) * np.array(sample.GetSpacing())
    grid = sitk.Image([int(n) for n in np.ceil(extent / spacing)], sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(sample.GetDirection())
    grid.SetOrigin(sample.TransformContinuousIndexToPhysicalPoint([-0.5, -0.5, -0.5]))
    direction = rotation(25, 1) @ np.array(sample.GetDirection()).reshape(3, 3)
    volume = with_direction(sitk.Resample(sample, grid, sitk.Transform(), sitk.sitkLinear, 0.0), direction)
    reference = with_direction(sitk.Resample(sitk.ReadImage(str(SAMPLE_LABEL)), grid, sitk.Transform(),
                                             sitk.sitkNearestNeighbor, 0), direction)

    labels = segmenter.segment(volume)
    assert_same_grid(labels, volume)
    dice = dice_per_label(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(reference), [1, 2])
    assert min(dice.values()) > 0.7

    for name in ("labels.nii.gz", "labels.nrrd"):
        written = sitk.ReadImage(str(write_labelmap(labels, tmp_path / name, segmenter.card.labels)))
        assert written.GetSize() == volume.GetSize()
        assert np.allclose(written.GetSpacing(), spacing, atol=1e-5)
        assert np.allclose(written.GetOrigin(), volume.GetOrigin(), atol=1e-4)
        assert np.allclose(written.GetDirection(), volume.GetDirection(), atol=1e-5)
        assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(labels))
    segmentation = slicerio.read_segmentation(str(write_labelmap(labels, tmp_path / "l.seg.nrrd",
                                                                 segmenter.card.labels)))
    assert np.allclose(segmentation["ijkToLPS"], ijk_to_lps(volume), atol=1e-5)
    assert np.array_equal(segmentation["voxels"], sitk.GetArrayFromImage(labels).transpose(2, 1, 0))


def edge_volumes(sample: sitk.Image) -> dict[str, sitk.Image]:
    array = sitk.GetArrayFromImage(sample)
    volumes = {
        "1 slice": sitk.GetImageFromArray(array[10:11]),
        "2 slices": sitk.GetImageFromArray(array[10:12]),
        "uint32 near overflow": sitk.GetImageFromArray((array.astype(np.float64) * 1e6).astype(np.uint32)),
        "int64": sitk.GetImageFromArray(array.astype(np.int64)),
        "constant": sitk.GetImageFromArray(np.zeros_like(array)),
    }
    tiny = sitk.Image(sample)
    tiny.SetSpacing((1e-4, 1e-4, 1e-4))
    volumes["0.1 micrometre spacing"] = tiny
    return volumes


@pytest.mark.parametrize("kind", list(edge_volumes(read_volume(SAMPLE_IMAGE))))
def test_edge_case_volumes_give_a_labelmap_on_their_own_grid(segmenter, sample, kind):
    volume = edge_volumes(sample)[kind]
    labels = segmenter.segment(volume)
    assert_same_grid(labels, volume)
    assert labels.GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize("target", [(23, 31, 17), (40, 18, 55), (20, 24, 28)], ids=["down", "mixed", "same"])
def test_slab_wise_argmax_equals_resizing_the_whole_map(target):
    """The memory-bounded post-processing (class maps looked up where a cell's corners agree, interpolated only
    where they differ) gives the labels of resizing all class maps at once, then argmax."""
    from hybridmim.geometry import resize, resized_argmax

    noise = torch.rand(1, 4, 20, 24, 28, generator=torch.Generator().manual_seed(0))
    scores = torch.nn.functional.avg_pool3d(noise, 5, 1, 2)[0]  # smooth: regions and boundaries, like real output
    expected = resize(scores, target).argmax(0).numpy()
    slabs = resized_argmax(scores, target, chunk_voxels=900)  # several slabs
    assert slabs.dtype == np.uint8 and slabs.shape == target
    assert len(np.unique(expected)) > 1
    assert (slabs == expected).mean() > 0.9999


def test_uniform_cells_mark_cells_whose_corners_disagree():
    from hybridmim.geometry import UNDECIDED, uniform_cells

    labels = torch.zeros(3, 3, 3, dtype=torch.uint8)
    labels[2, 2, 2] = 1
    cells = uniform_cells(labels)
    assert cells[1, 1, 1] == UNDECIDED and cells[2, 1, 2] == UNDECIDED  # (2, 2, 2) is one of their corners
    assert cells[2, 2, 2] == 1  # the far face repeats itself
    assert cells[0, 0, 0] == 0 and cells[1, 1, 0] == 0 and (cells == UNDECIDED).sum() == 7


def test_class_argmax_takes_the_first_maximum_like_torch():
    from hybridmim.geometry import class_argmax

    scores = torch.randint(0, 3, (5, 6, 7, 8), generator=torch.Generator().manual_seed(1)).float()  # many ties
    assert torch.equal(class_argmax(scores), scores.argmax(0).to(torch.uint8))


def test_network_input_does_not_depend_on_how_the_axes_are_stored(sample):
    """Resampling runs in the file's own axis order; the same anisotropic volume stored permuted and flipped
    gives the same network input."""
    from hybridmim.geometry import model_grid
    from hybridmim.model_card import Intensity
    from hybridmim.preprocessing import model_input

    anisotropic = sitk.Image(sample)
    anisotropic.SetSpacing((0.7, 1.3, 2.5))
    stored_differently = sitk.Flip(sitk.PermuteAxes(anisotropic, [2, 0, 1]), [True, False, True])
    inputs = [model_input(volume, model_grid(volume, (1.0, 1.0, 1.0)), Intensity("zscore"))
              for volume in (anisotropic, stored_differently)]
    expected_shape = tuple(round(n * s) for n, s in zip(sample.GetSize(), (0.7, 1.3, 2.5)))
    assert inputs[0].shape == inputs[1].shape == (1, *expected_shape)
    np.testing.assert_allclose(inputs[0], inputs[1], atol=1e-5)


def centroid(mask: np.ndarray) -> np.ndarray:
    return np.array(np.nonzero(mask), dtype=float).mean(axis=1)


def test_labels_resampled_to_the_model_grid_and_back_stay_aligned(shared_data):
    """Real left-atrium labels (0.625 mm) taken to the model's 1 mm and back, as training and fine-tuning take
    them: each keeps Dice >= 0.975 against itself, and their centroids do not move on average (< 0.1 voxel on every
    axis; a single case moves by up to about a third of a voxel, the quantisation of a 1 mm grid). Legacy
    'nearest' (floor indexing) moves them by more than a voxel."""
    import torch.nn.functional as F

    from hybridmim.geometry import image_to_canonical, model_grid, resize_labels
    from hybridmim.imageio import read_volume
    from hybridmim.metrics import dice_per_label

    def legacy(array, shape):
        return F.interpolate(torch.from_numpy(array)[None, None].float(), size=shape, mode="nearest")[0, 0].numpy()

    shifts, legacy_shifts = [], []
    for path in sorted((shared_data / "la" / "labelsTr").glob("*.nii.gz"))[:8]:
        label_image = read_volume(path)
        grid = model_grid(label_image, [1.0, 1.0, 1.0])
        values = image_to_canonical(label_image, grid).astype(np.uint8)
        assert grid.model_shape != values.shape
        back = resize_labels(resize_labels(values, grid.model_shape, 2), values.shape, 2)
        assert dice_per_label(back, values, [1])[1] >= 0.975, path.name
        shifts.append(centroid(back == 1) - centroid(values == 1))
        legacy_shifts.append(centroid(legacy(legacy(values, grid.model_shape), values.shape) == 1)
                             - centroid(values == 1))
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.1
    assert np.abs(np.mean(legacy_shifts, axis=0)).max() > 0.5


def test_label_resizing_falls_back_to_nearest_exact_for_huge_maps(monkeypatch):
    import hybridmim.geometry as geometry

    labels = np.zeros((10, 10, 10), np.uint8)
    labels[3:7, 3:7, 3:7] = 1
    exact = geometry.resize_labels(labels, (20, 20, 20), 2)
    monkeypatch.setattr(geometry, "ONE_HOT_BYTES", 0)
    nearest = geometry.resize_labels(labels, (20, 20, 20), 2)
    assert np.array_equal(nearest[6:14, 6:14, 6:14], np.ones((8, 8, 8), np.uint8)) and nearest.sum() == 512
    assert np.abs(centroid(exact == 1) - centroid(labels.repeat(2, 0).repeat(2, 1).repeat(2, 2) == 1)).max() < 0.1
