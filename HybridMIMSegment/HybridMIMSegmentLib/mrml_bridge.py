"""Between MRML nodes and the engine: volume node -> SimpleITK image, labelmap -> segmentation node, image on a
volume's grid -> volume node.

Uses only MRML data classes (no Qt, no application, no global ``slicer.mrmlScene``), so it runs inside Slicer and,
for tests, with the ``slicer-core`` package. Geometry is carried exactly: MRML stores RAS, the engine LPS.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from hybridmim.errors import InputImageError
from hybridmim.model_card import Label

RAS_LPS = np.diag([-1.0, -1.0, 1.0])
DEFAULT_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def image_from_volume_node(volume_node) -> sitk.Image:
    """A copy of a scalar volume node's voxels with its geometry (parent transforms are not applied)."""
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None:
        raise InputImageError("No input volume, or the volume has no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputImageError(f"Volume '{volume_node.GetName()}' has {image_data.GetNumberOfScalarComponents()} "
                              "components per voxel; a scalar (grey-level) volume is required")
    dims = image_data.GetDimensions()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(array)  # copies: the worker thread never touches MRML memory
    ras_directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(ras_directions)
    image.SetDirection((RAS_LPS @ ras_directions).flatten().tolist())
    image.SetSpacing(volume_node.GetSpacing())
    image.SetOrigin((RAS_LPS @ np.array(volume_node.GetOrigin())).tolist())
    return image


def reference_volume_node(segmentation_node):
    """The volume a segmentation was drawn on, or None when that cannot be known.

    First the segmentation's reference-geometry node reference (set by Segment Editor and by Segment in this
    module); else, for a segmentation loaded from a file (no node reference), the one scalar volume in the scene
    whose grid equals the segmentation's stored reference geometry.
    """
    referenced = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    if is_grey_volume(referenced):
        return referenced
    stored = _parse_geometry(segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()))
    scene = segmentation_node.GetScene()
    if stored is None or scene is None:
        return None
    volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    matches = []
    for i in range(volumes.GetNumberOfItems()):
        volume = volumes.GetItemAsObject(i)
        if (is_grey_volume(volume)
                and volume.GetParentTransformNode() is segmentation_node.GetParentTransformNode()
                and _same_geometry(stored, _volume_geometry(volume))):
            matches.append(volume)
    return matches[0] if len(matches) == 1 else None


def is_grey_volume(node) -> bool:
    """A single-component scalar volume with voxels: not a label map, vector (RGB), tensor or DWI volume (all of
    them subclasses of the scalar volume node)."""
    return (node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
            and not node.IsA("vtkMRMLTensorVolumeNode") and not node.IsA("vtkMRMLDiffusionWeightedVolumeNode")
            and node.GetImageData() is not None and node.GetImageData().GetNumberOfScalarComponents() == 1)


def _parse_geometry(serialized: str) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """Slicer's serialised image geometry: 16 IJK-to-RAS matrix values then the 6 extent values."""
    try:
        values = [float(v) for v in serialized.split(";") if v.strip()]
    except (AttributeError, ValueError):
        return None
    if len(values) != 22:
        return None
    return np.array(values[:16]).reshape(4, 4), tuple(int(round(v)) for v in values[16:])


def _volume_geometry(volume_node) -> tuple[np.ndarray, tuple[int, ...]] | None:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _parse_geometry(slicer.vtkSegmentationConverter.SerializeImageGeometry(matrix, volume_node.GetImageData()))


def _same_geometry(a, b) -> bool:
    """Same grid; the tolerance absorbs the float formatting of serialised geometry (files round-trip it)."""
    return b is not None and a[1] == b[1] and np.allclose(a[0], b[0], rtol=1e-6, atol=1e-4)


def ensure_segmentation_converters() -> None:
    """Slicer's Segmentations module registers these at start-up; bare MRML (slicer-core) needs them too."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def terminology_tag(label: Label) -> str | None:
    """Slicer's serialised terminology entry: context~category~type~type modifier~anatomic context~region~modifier."""
    terminology = label.terminology
    if not terminology:
        return None

    def code(key: str) -> str:
        return "^".join(terminology.get(key) or ["", "", ""])

    return "~".join([terminology.get("contextName", ""), code("category"), code("type"), code("typeModifier"),
                     terminology.get("anatomicContextName", DEFAULT_ANATOMIC_CONTEXT), code("anatomicRegion"),
                     code("anatomicRegionModifier")])


def update_segmentation_node(segmentation_node, labelmap: sitk.Image, labels: Sequence[Label], volume_node,
                             replace: bool = True) -> list[str]:
    """Put each label of ``labelmap`` (on ``volume_node``'s grid) into a named, coloured segment.

    With ``replace``, segments of the same name are overwritten in place (their ids and display settings kept);
    otherwise new segments are added. Returns the segment ids written, in label order.
    """
    ensure_segmentation_converters()
    scene = segmentation_node.GetScene()
    if tuple(labelmap.GetSize()) != tuple(volume_node.GetImageData().GetDimensions()):
        raise InputImageError("The labelmap does not have the reference volume's size")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    # the segmentation lives in the volume's coordinate frame: same parent transform (a hierarchy follows)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    for label in labels:
        segment_id = segmentation.GetSegmentIdBySegmentName(label.name) if replace else ""
        if not segment_id:
            segment_id = segmentation.AddEmptySegment("", label.name, list(label.color))
        segment = segmentation.GetSegment(segment_id)
        segment.SetColor(list(label.color))
        # fixed name and colour: Slicer's terminology selector must not rename what the model (and a fine-tune
        # reading the segment names) means
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        tag = terminology_tag(label)
        if tag:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
        segment_ids.InsertNextValue(segment_id)

    with _temporary_nodes(scene):
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__hybridmim_import__")
        labelmap_node.CopyOrientation(volume_node)
        # in the segmentation's frame too, or Slicer resamples the labels through the transform on import
        labelmap_node.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
        labelmap_node.SetAndObserveImageData(_image_data(labelmap, vtk.VTK_UNSIGNED_CHAR, np.uint8))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap_node, segmentation_node, segment_ids):
            raise RuntimeError("Slicer could not import the labelmap into the segmentation")
    return [segment_ids.GetValue(i) for i in range(segment_ids.GetNumberOfValues())]


def _image_data(image: sitk.Image, vtk_type: int, dtype: type) -> vtk.vtkImageData:
    """A vtkImageData holding a copy of ``image``'s voxels (same memory order: i fastest)."""
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(image.GetSize())
    image_data.AllocateScalars(vtk_type, 1)
    numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())[:] = \
        sitk.GetArrayViewFromImage(image).astype(dtype).ravel()
    return image_data


def volume_node_like(volume_node, image: sitk.Image, name: str, node=None):
    """A scalar volume node (``node``, or a new one named ``name``) holding ``image``, which is on ``volume_node``'s
    grid, in ``volume_node``'s geometry and frame (same parent transform): e.g. an uncertainty map to overlay."""
    if tuple(image.GetSize()) != tuple(volume_node.GetImageData().GetDimensions()):
        raise InputImageError(f"The image does not have the size of volume '{volume_node.GetName()}'")
    scene = volume_node.GetScene()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    node.CopyOrientation(volume_node)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetAndObserveImageData(_image_data(image, vtk.VTK_FLOAT, np.float32))
    node.CreateDefaultDisplayNodes()
    return node


def labelmap_array_from_segmentation(segmentation_node, segment_ids: Sequence[str], volume_node) -> np.ndarray:
    """Export segments to a labelmap on ``volume_node``'s grid (value i+1 for segment_ids[i]); (k, j, i) array."""
    ensure_segmentation_converters()
    scene = segmentation_node.GetScene()
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    with _temporary_nodes(scene):
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__hybridmim_export__")
        # the volume's whole grid (not the segments' extent); Slicer resamples through the transforms between
        # the segmentation and the volume when their parents differ (a segmentation drawn in world coordinates)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap_node, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError("Slicer could not export the segments to a labelmap")
        image_data = labelmap_node.GetImageData()
        dims = image_data.GetDimensions()
        return numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


@contextmanager
def _temporary_nodes(scene):
    """Remove every node added inside the block (temporary labelmaps and the colour tables and display nodes that
    Slicer's import/export create for them); the scene's subject hierarchy singleton stays."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before and not node.IsA("vtkMRMLSubjectHierarchyNode"):
                scene.RemoveNode(node)
