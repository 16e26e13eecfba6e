"""Reading volumes (any SimpleITK format or a DICOM series folder) and writing labelmaps, with checks that turn
every unusable input into one clear error and never leave a partial output file."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicerio

from .errors import InputImageError, OutputError
from .model_card import Label
from .staging import probe_new_file, remove_stale_staging

LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = LABELMAP_SUFFIXES[1:]  # volumes that are not label maps (e.g. an uncertainty map)
STAGING_PREFIX = ".hybridmim-"  # a label map is written in such a folder next to its target, then renamed


def read_volume(path: str | os.PathLike, series: str | None = None) -> sitk.Image:
    """Read one scalar 3D volume from a file or a DICOM series folder (``series``: which series of a folder that
    holds several)."""
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"Input not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path, series)
    else:
        if path.stat().st_size == 0:
            raise InputImageError(f"Input file is empty: {path}")
        _check_fits_in_memory(path, _header(path))  # from the header alone: a gzip bomb is never decompressed
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(path)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise InputImageError(f"Cannot read {path}: not an image or the file is truncated/corrupt "
                                  f"({_first_line(error)})") from error
    image = _as_scalar_3d(image, path)
    _check_geometry(image, path)
    _check_values(image, path)
    return image


ORTHONORMAL_TOLERANCE = 1e-4  # headers round directions to about 6 decimals; a skew or scale shows far above it
FLOAT32_MAX = float(np.finfo(np.float32).max)  # NIfTI stores spacing and origin as float32


def _check_geometry(image: sitk.Image, path: Path) -> None:
    """Refuse a geometry the label map could not keep exactly: non-finite or non-positive spacing, an origin or
    spacing beyond what NIfTI stores, or a direction matrix whose axes are not perpendicular unit vectors (a
    skewed or scaled matrix: the output would come out rotated or resized)."""
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not (np.isfinite(spacing).all() and np.isfinite(origin).all() and np.isfinite(direction).all()):
        raise InputImageError(f"{path} has a non-finite spacing, origin or direction in its header")
    if (spacing <= 0).any() or np.abs(np.concatenate([spacing, origin])).max() > FLOAT32_MAX:
        raise InputImageError(f"{path} has an unusable spacing {spacing.tolist()} or origin {origin.tolist()} mm")
    if not np.allclose(direction.T @ direction, np.eye(3), rtol=0, atol=ORTHONORMAL_TOLERANCE):
        rows = "; ".join(" ".join(f"{v:.4g}" for v in row) for row in direction)
        raise InputImageError(f"{path} has a direction matrix whose axes are not perpendicular unit vectors "
                              f"({rows}): the label map could not keep its geometry. Resample it to an "
                              f"orthonormal grid first (e.g. in Slicer: Resample Scalar Volume)")


BYTES_PER_VOXEL_AFTER_READING = 5  # a float32 working copy and the uint8 labels, on top of the voxels themselves


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere physical memory), or None."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _header(path: Path) -> sitk.ImageFileReader | None:
    """A reader with the file's header read (size, voxel type), or None when it has no readable header."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _check_fits_in_memory(path: Path, header: sitk.ImageFileReader | None, slices: int = 1) -> None:
    """Refuse, from the header alone, a volume whose voxels and working copies cannot fit in memory: reading it
    would otherwise end in the system killing the process (Slicer included) instead of an error. ``slices``:
    the number of files of a DICOM series whose first file ``header`` is."""
    if header is None:
        return  # ReadImage reports why the file cannot be read
    voxels = int(np.prod(header.GetSize(), dtype=np.float64)) * slices
    component = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * header.GetDimension(),
                                                                  header.GetPixelID())).dtype).itemsize
    needed = voxels * (component * header.GetNumberOfComponents() + BYTES_PER_VOXEL_AFTER_READING)
    available = available_memory()
    if available is not None and needed > available:
        size = "x".join(str(n) for n in header.GetSize()) + (f" x {slices} files" if slices > 1 else "")
        raise InputImageError(f"{path} is {size} voxels: segmenting it needs about {needed / 2**30:.1f} GiB of "
                              f"memory and {available / 2**30:.1f} GiB is available")


def _check_nifti_complete(path: Path) -> None:
    """ITK's NIfTI reader silently zero-fills a truncated file; check that all voxel bytes are there."""
    try:
        with (gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")) as stream:
            header = stream.read(544)
            total = len(header) + sum(len(block) for block in iter(lambda: stream.read(1 << 22), b""))
    except (OSError, EOFError, zlib.error) as error:
        raise InputImageError(f"Cannot read {path}: the file is truncated or corrupt ({error})") from error
    expected = _nifti_data_end(header)
    if expected is not None and total < expected:
        raise InputImageError(f"Cannot read {path}: the file is truncated ({total} of {expected} bytes)")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(2) == b"\x1f\x8b"


def _nifti_data_end(header: bytes) -> int | None:
    """Byte offset where the voxel data of a NIfTI-1 or NIfTI-2 file ends (None if the header is unknown)."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
        elif len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        count = int(np.prod([max(int(n), 1) for n in dims[1:1 + max(0, min(int(dims[0]), 7))]]))
        return offset + count * bitpix // 8
    return None


def _read_dicom_folder(folder: Path, series: str | None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    found = reader.GetGDCMSeriesIDs(str(folder))
    if not found:
        raise InputImageError(f"No DICOM series found in folder {folder}")
    if series is None and len(found) > 1 or series is not None and series not in found:
        listing = "; ".join(_describe_series(folder, uid) for uid in found)
        head = f"{folder} has no DICOM series {series}" if series else f"{folder} holds {len(found)} DICOM series"
        raise InputImageError(f"{head}: {listing}. Choose one with --series UID, or give a folder holding one series")
    files = reader.GetGDCMSeriesFileNames(str(folder), series or found[0])
    _check_slices(files)
    _check_fits_in_memory(folder, _header(Path(files[0])), slices=len(files))
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputImageError(f"Cannot read the DICOM series in {folder} ({_first_line(error)})") from error


def _describe_series(folder: Path, uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    header = _header(Path(files[0]))
    description = header.GetMetaData("0008|103e").strip() if header and header.HasMetaDataKey("0008|103e") else ""
    return f"{uid} ({len(files)} files{', ' + description if description else ''})"


SLICE_SPACING_TOLERANCE = 0.01  # relative; scanners write positions to about a micron


def _check_slices(files: Sequence[str]) -> None:
    """A series read as one volume must be one stack: same orientation, no two slices at one position, no missing
    slice, even spacing. ITK would otherwise build a volume with wrong geometry without a word."""
    if len(files) < 3:
        return
    positions, orientations = [], set()
    for name in files:
        header = _header(Path(name))
        if header is None or not (header.HasMetaDataKey("0020|0032") and header.HasMetaDataKey("0020|0037")):
            return  # no per-slice geometry (e.g. one multi-frame file): ITK's own reading decides
        try:
            positions.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
            orientations.add(tuple(round(float(v), 4) for v in header.GetMetaData("0020|0037").split("\\")))
        except ValueError:
            return
    if len(orientations) > 1:
        raise InputImageError(f"The DICOM series of {Path(files[0]).parent} mixes slice orientations; it is not one "
                              "volume (load it with Slicer's DICOM module)")
    row, column = np.array(next(iter(orientations))[:3]), np.array(next(iter(orientations))[3:])
    depth = np.array(positions) @ np.cross(row, column)
    order = np.argsort(depth)
    steps = np.diff(depth[order])
    spacing = float(np.median(steps))
    for index, step in enumerate(steps):
        first, second = Path(files[order[index]]).name, Path(files[order[index + 1]]).name
        if step < SLICE_SPACING_TOLERANCE * max(spacing, 1e-3):
            raise InputImageError(f"DICOM slices {first} and {second} are at the same position: the series holds "
                                  "duplicate slices")
        if abs(step - spacing) > SLICE_SPACING_TOLERANCE * spacing:
            raise InputImageError(f"DICOM slices {first} and {second} are {step:.3f} mm apart where the series is "
                                  f"{spacing:.3f} mm apart elsewhere: a slice is missing or the spacing is uneven")


def _as_scalar_3d(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                              "(colour or vector image); a scalar (grey-level) volume is required")
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    elif image.GetDimension() == 4:
        raise InputImageError(f"{path} is a 4D image ({size[3]} volumes of {size[:3]}); give one 3D volume")
    elif image.GetDimension() != 3:
        raise InputImageError(f"{path} is a {image.GetDimension()}D image of size {size}; a 3D volume is required")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputImageError(f"{path} has complex voxels; a real-valued volume is required")
    return image


MAX_INFINITE_FRACTION = 0.001  # a few corrupt voxels are replaced; more means the stored values overflowed


def _check_values(image: sitk.Image, path: Path) -> None:
    """NaN voxels (masked-out background) and a few infinite ones are tolerated; many infinite voxels mean the
    reader overflowed (a NIfTI ``scl_slope`` of 1e37 turns most voxels into inf) and the image is lost."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    values = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(values)
    if not finite.any():
        raise InputImageError(f"{path} contains no finite values (all NaN or infinite)")
    infinite = int(np.isinf(values).sum())
    if infinite > MAX_INFINITE_FRACTION * values.size:
        raise InputImageError(f"{path}: {infinite} of {values.size} voxels are infinite: the stored values overflow "
                              "when scaled (a NIfTI header's scl_slope too large?); rescale the volume and save it "
                              "again")


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


MAX_NAME_BYTES = 255  # the longest file name common file systems store


def check_output_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None,
                      suffixes: Sequence[str] = LABELMAP_SUFFIXES) -> Path:
    """Refuse, before any work is done, an output name we cannot write or one that would overwrite the input:
    an unknown suffix, a folder, an over-long name, a parent that is a file or a folder we may not write in."""
    path = Path(path)
    if not path.name.lower().endswith(tuple(suffixes)):
        raise OutputError(f"Cannot write '{path.name}': use one of {', '.join(suffixes)}")
    if len(os.fsencode(path.name)) > MAX_NAME_BYTES:
        raise OutputError(f"Output name is {len(os.fsencode(path.name))} bytes long; file systems store at most "
                          f"{MAX_NAME_BYTES}: {path.name[:40]}...")
    if path.is_dir():
        raise OutputError(f"Output {path} is a folder; give a file name")
    existing = path.absolute().parent
    while not existing.exists():  # the folders still to be made go into the first one that exists
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"Cannot write {path}: {existing} is a file, not a folder")
    try:
        probe_new_file(existing)
    except OSError as error:
        raise OutputError(f"Cannot write {path}: {existing} does not accept new files ({error.strerror})") from error
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise OutputError("The output would overwrite the input volume; choose another output path")
    return path


def write_labelmap(labelmap: sitk.Image, path: str | os.PathLike, labels: Sequence[Label]) -> Path:
    """Write a uint8 labelmap as a Slicer ``.seg.nrrd`` (named, coloured segments) or a plain labelmap file, as
    ``write_image`` does."""
    path = check_output_path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        return _write_checked(labelmap, path)
    return _write_checked(labelmap, path, lambda staged: slicerio.write_segmentation(
        str(staged), segmentation_dict(labelmap, labels)))


def write_image(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write a volume (e.g. an uncertainty map) as a plain image file.

    The file appears complete or not at all: it is written next to the target, read back and compared with the
    image (a full disk truncates some formats without an error), and only then renamed into place; a ``.mhd``
    header's data file is moved before the header.
    """
    return _write_checked(image, check_image_path(path))


def check_image_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """``check_output_path`` for a volume that is not a label map: a Slicer segmentation name is refused too."""
    if Path(path).name.lower().endswith(".seg.nrrd"):
        raise OutputError(f"Cannot write '{Path(path).name}': a .seg.nrrd holds segments, not an image; use one of "
                          f"{', '.join(IMAGE_SUFFIXES)}")
    return check_output_path(path, input_path, IMAGE_SUFFIXES)


def _write_checked(image: sitk.Image, path: Path, write: Callable[[Path], object] | None = None) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path.parent, STAGING_PREFIX)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=path.parent))
    except OSError as error:
        raise OutputError(f"Cannot write {path}: {error}") from error
    try:
        staged = staging / path.name
        if write is not None:
            write(staged)
        else:
            sitk.WriteImage(image, str(staged), useCompression=True)
        _check_written(staged, image)
        for data_file in sorted(set(staging.iterdir()) - {staged}):  # a .mhd's .zraw
            os.replace(data_file, path.parent / data_file.name)
        os.replace(staged, path)
    except (OSError, RuntimeError) as error:
        raise OutputError(f"Cannot write {path}: {_first_line(error)}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _check_written(staged: Path, labelmap: sitk.Image) -> None:
    """The staged file reads back as exactly ``labelmap``'s (or an image's) voxels, or OSError (disk full, quota,
    I/O error)."""
    try:
        if staged.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(staged)
        back = sitk.ReadImage(str(staged))
    except (InputImageError, RuntimeError) as error:
        raise OSError(f"the written file does not read back; is the disk full? ({_first_line(error)})") from error
    if back.GetSize() != labelmap.GetSize() or not np.array_equal(sitk.GetArrayViewFromImage(back),
                                                                  sitk.GetArrayViewFromImage(labelmap)):
        raise OSError("the written file does not hold the voxels written; is the disk full?")


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def segmentation_dict(labelmap: sitk.Image, labels: Sequence[Label]) -> dict:
    """The slicerio representation of a labelmap: one layer, one segment per label, geometry of ``labelmap``."""
    voxels = sitk.GetArrayFromImage(labelmap).transpose(2, 1, 0).astype(np.uint8)
    segmentation = slicerio.create_segmentation(voxels.shape, ijk_to_lps(labelmap))
    segmentation["voxels"] = voxels
    segmentation["segments"] = []
    for label in labels:
        present = np.argwhere(voxels == label.value)
        extent = ([int(v) for pair in zip(present.min(0), present.max(0)) for v in pair] if len(present)
                  else [0, -1, 0, -1, 0, -1])
        segment = {"id": f"Segment_{label.value}", "name": label.name, "color": list(label.color),
                   "labelValue": label.value, "layer": 0, "extent": extent}
        if label.terminology:
            segment["terminology"] = label.terminology
        segmentation["segments"].append(segment)
    return segmentation
