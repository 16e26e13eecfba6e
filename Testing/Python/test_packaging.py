"""The Slicer extension files stay true to the code: every module file listed, every UI name the widget uses
exists, the extension depends on the PyTorch extension, the engine never imports Slicer/Qt/VTK."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET

from conftest import REPO

MODULE = REPO / "HybridMIMSegment"


def test_module_cmakelists_lists_every_python_file_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s+([\w/${}]+\.(?:py|png|ui))\s*$", cmake, re.MULTILINE))
    listed = {name.replace("${MODULE_NAME}", "HybridMIMSegment") for name in listed}
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert on_disk <= listed, f"missing from CMakeLists.txt: {sorted(on_disk - listed)}"
    for name in listed:
        assert (MODULE / name).is_file(), name
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest" in cmake


def test_extension_description_depends_on_pytorch():
    assert re.search(r"set\(EXTENSION_DEPENDS\s+PyTorch\)", (REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert re.search(r"^depends PyTorch$", (REPO / "HybridMIMSegment.s4ext").read_text(encoding="utf-8"), re.MULTILINE)
    entry = json.loads((REPO / "HybridMIMSegment.json").read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Segmentation"


def test_every_ui_name_the_widget_uses_exists_in_the_ui_file():
    names = {w.get("name") for w in ET.parse(MODULE / "Resources" / "UI" / "HybridMIMSegment.ui").iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "HybridMIMSegment.py").read_text(encoding="utf-8")))
    assert used and used <= names, f"not in the .ui file: {sorted(used - names)}"


def test_ui_parameter_bindings_name_parameter_node_fields():
    tree = ET.parse(MODULE / "Resources" / "UI" / "HybridMIMSegment.ui")
    bound = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    source = (MODULE / "HybridMIMSegment.py").read_text(encoding="utf-8")
    parameter_class = source.split("class HybridMIMSegmentParameterNode")[1].split("\nclass ")[0]
    fields = set(re.findall(r"^    (\w+): ", parameter_class, re.MULTILINE))
    assert bound and bound <= fields, f"bound but not parameters: {sorted(bound - fields)}"


def test_engine_and_training_never_import_slicer_qt_or_vtk():
    forbidden = {"slicer", "qt", "vtk", "ctk"}
    for path in [*(MODULE / "hybridmim").rglob("*.py"), *(REPO / "training").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{path} imports {roots & forbidden}"


def test_listing_models_does_not_need_torch():
    """Slicer shows the model cards before its Python packages are installed."""
    import subprocess
    import sys

    code = ("import sys; import hybridmim.model_store as s; ids = [m.card.id for m in s.list_models()]; "
            "print(ids, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "hippocampus-cnn" in out and out.strip().endswith("False")


def test_extension_metadata_points_only_at_files_that_exist():
    prefix = "https://raw.githubusercontent.com/HybridMIMSegment/HybridMIMSegment/main/"
    for name in ("CMakeLists.txt", "HybridMIMSegment.s4ext"):
        urls = re.findall(re.escape(prefix) + r"(\S+?)[\s\")]", (REPO / name).read_text(encoding="utf-8"))
        assert urls, name
        for path in urls:
            assert (REPO / path).is_file(), f"{name} points at {path}, which does not exist"


def test_loading_the_slicer_module_imports_nothing_heavy():
    """What HybridMIMSegment.py imports from the engine at load time pulls in neither torch, MONAI, SimpleITK nor
    numpy: the module opens before the Python packages are installed, and Slicer's process never imports torch."""
    import subprocess
    import sys

    tree = ast.parse((MODULE / "HybridMIMSegment.py").read_text(encoding="utf-8"))
    engine = [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module
              and node.module.split(".")[0] in ("hybridmim", "HybridMIMSegmentLib")]
    assert engine, "expected the module to read its defaults from the engine"
    code = (f"import sys; sys.path.insert(0, {str(MODULE)!r}); "
            + "; ".join(f"import {name}" for name in engine)
            + "; print(sorted(m for m in ('torch', 'monai', 'SimpleITK', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
