"""The Slicer extension files stay true to the code: every module file listed, every UI name the widget uses
exists, the extension depends on the PyTorch extension, the engine never imports Slicer/Qt/VTK."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

import pytest

from conftest import REPO, SAMPLE_IMAGE

MODULE = REPO / "HybridMIMSegment"


def test_module_cmakelists_lists_every_python_file_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s+([\w/${}]+\.(?:py|png|ui|txt))\s*$", cmake, re.MULTILINE))
    listed = {name.replace("${MODULE_NAME}", "HybridMIMSegment") for name in listed}
    files = [*MODULE.rglob("*.py"), *(MODULE / "hybridmim").glob("*.txt")]  # the engine's requirements list
    on_disk = {str(p.relative_to(MODULE)) for p in files if "__pycache__" not in p.parts}
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


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_works_outside_the_source_tree(tmp_path):
    """A normal install, not an editable one: the wheel holds every engine and training module, both tools run
    from it, and without the bundled models the error names the setting that points at them."""
    source = tmp_path / "source"  # pip builds in the source folder: a copy keeps build/ out of the checkout
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for folder in ("HybridMIMSegment/hybridmim", "training"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []  # else pip fetches it
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), *offline], check=True, timeout=600, capture_output=True)
    wheel = next((tmp_path / "dist").glob("hybridmim_segment-*.whl"))
    sources = {f"hybridmim/{p.relative_to(MODULE / 'hybridmim')}" for p in (MODULE / "hybridmim").rglob("*.py")}
    sources |= {f"hybridmim_training/{p.relative_to(REPO / 'training')}" for p in (REPO / "training").rglob("*.py")}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert sources <= names, f"not in the wheel: {sorted(sources - names)}"
    assert "hybridmim/requirements.txt" in names

    env = {key: value for key, value in os.environ.items() if key != "HYBRIDMIM_BUNDLED_MODELS"}
    env.update(PYTHONPATH=str(tmp_path / "site"), HYBRIDMIM_USER_MODELS=str(tmp_path / "user"))

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env={**env, **extra}, capture_output=True,
                              text=True, timeout=300)

    where = run("-c", "import hybridmim, hybridmim_training.pretraining.pretrain as p; print(hybridmim.__file__); "
                      "print(p.__file__)").stdout.split()
    assert len(where) == 2 and all(path.startswith(str(tmp_path / "site")) for path in where)
    assert run("-m", "hybridmim_training.cli", "pretrain", "--help").returncode == 0
    missing = run("-m", "hybridmim.cli", "segment", str(SAMPLE_IMAGE), "-o", str(tmp_path / "out.nii.gz"))
    assert missing.returncode == 2 and "HYBRIDMIM_BUNDLED_MODELS" in missing.stderr.strip().splitlines()[-1]
    found = run("-m", "hybridmim.cli", "models", "--json", HYBRIDMIM_BUNDLED_MODELS=str(REPO / "Resources" / "Models"))
    assert "hippocampus-cnn" in {model["id"] for model in json.loads(found.stdout)["models"]}
