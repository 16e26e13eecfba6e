"""Real MRML volume nodes for the slicer-core tests: read by Slicer's own reader, made oblique/anisotropic."""

from __future__ import annotations

import vtk


def load_volume_node(scene, path, name=None):
    """Read a file with Slicer's own volume reader, as File > Add Data does."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or path.name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def reshape(volume_node, angles=(25, -15, 10), spacing=None):
    """Make the volume oblique (and anisotropic): its voxels stay, its grid moves."""
    if spacing is not None:
        volume_node.SetSpacing(*spacing)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    transform = vtk.vtkTransform()
    transform.RotateZ(angles[0])
    transform.RotateX(angles[1])
    transform.RotateY(angles[2])
    rotated = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(transform.GetMatrix(), matrix, rotated)
    volume_node.SetIJKToRASMatrix(rotated)
