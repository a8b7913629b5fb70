"""The formats layer: file-format facts defined once, manifests read through one checked path, and a
runtime that depends on formats alone (never on training or export code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tl_deploy.errors import ArtifactError
from tl_deploy.formats import names
from tl_deploy.formats.engine_sidecar import BatchProfile, sidecar_path
from tl_deploy.formats.export_manifest import (
    MANIFEST_FORMAT,
    export_file,
    make_export_manifest,
    read_export_manifest,
    usable_files,
)

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "onnx", "tensorrt")
TRAINING_OR_EXPORT = ("tl_deploy.export", "tl_deploy.train", "tl_deploy.finetune", "tl_deploy.frozen",
                      "tl_deploy.artifact", "tl_deploy.data")


def _imported_after(code: str) -> list[str]:
    """Module names in sys.modules after running ``code`` in a fresh interpreter."""
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _offending(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)]


def test_formats_import_nothing_heavy() -> None:
    modules = _imported_after("import tl_deploy.formats.names, tl_deploy.formats.metadata, "
                              "tl_deploy.formats.export_manifest, tl_deploy.formats.engine_sidecar")
    assert not _offending(modules, HEAVY + TRAINING_OR_EXPORT + ("tl_deploy.runtime", "onnxruntime"))


def test_runtime_depends_on_nothing_from_training_or_export(export_dir: Path) -> None:
    """The edge layer: importing the runtime and running its onnxruntime backend pulls in no training or
    export module, no torch and no onnx (the torch backend imports them lazily, only when used)."""
    modules = _imported_after(
        "import tl_deploy.runtime, tl_deploy.runtime.onnxruntime_backend, tl_deploy.runtime.catalog\n"
        "import tl_deploy.runtime.tensorrt_backend, tl_deploy.runtime.gpu\n"
        "from tl_deploy.runtime import export_choices, load\n"
        f"clf = load({str(export_dir)!r}, device='cpu')\n"
        f"assert export_choices(__import__('pathlib').Path({str(export_dir)!r}), tensorrt_ok=False)\n"
        "clf.close()"
    )
    assert not _offending(modules, HEAVY + TRAINING_OR_EXPORT)


def test_openvino_backend_depends_on_nothing_from_training_or_export(export_dir: Path) -> None:
    """The OpenVINO path is edge code too: no torch, no onnx, no training or export module."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'tl_deploy[openvino]')")
    modules = _imported_after(
        "import tl_deploy.runtime.openvino_backend, tl_deploy.runtime.cpu\n"
        "from tl_deploy.runtime import load\n"
        f"clf = load({str(export_dir)!r}, backend='openvino')\n"
        "assert clf.backend_name == 'openvino'\n"
        "clf.close()"
    )
    assert "openvino" in modules and not _offending(modules, HEAVY + TRAINING_OR_EXPORT)


def test_each_fact_is_defined_once() -> None:
    """No module of the library spells an export file name or the manifest name itself."""
    literals = ['"export.json"', '"model.onnx"', '"model.fp16.onnx"', '"model.int8.onnx"', '"model.int8.cpu.onnx"',
                '"float32_nchw"', '"uint8_nhwc"', '"tl_deploy.trt_engine"']
    allowed = {ROOT / "tl_deploy/formats/names.py", ROOT / "tl_deploy/formats/engine_sidecar.py",
               ROOT / "tl_deploy/fileio.py"}  # fileio's output rule keeps its marker table (tests/test_outputs.py)
    found = [f"{path.relative_to(ROOT)}: {lit}" for path in sorted(ROOT.glob("tl_deploy/**/*.py"))
             if path not in allowed for lit in literals if lit in path.read_text()]
    assert not found, found


def test_file_names() -> None:
    assert names.engine_file("int8") == "model.int8.engine"
    assert sidecar_path(Path("e/model.fp16.engine")) == Path("e/model.fp16.engine.json")
    assert str(BatchProfile(1, 8, 32)) == "1:8:32"
    assert names.PRECISIONS == ("fp32", "fp16", "int8") and names.FLOAT_NCHW in names.INPUT_LAYOUTS


def _folder(tmp_path: Path, files: list[dict[str, object]] | str) -> Path:
    folder = tmp_path / "export" / "run"
    folder.mkdir(parents=True)
    text = files if isinstance(files, str) else json.dumps({"format": MANIFEST_FORMAT, "files": files})
    (folder / names.EXPORT_MANIFEST).write_text(text)
    return folder


def test_export_manifest_is_read_through_one_checked_path(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"Export folder not found: .*python -m tl_deploy.export models/run"):
        read_export_manifest(tmp_path, model_dir=Path("models/run"))
    with pytest.raises(ArtifactError, match="Corrupt"):
        read_export_manifest(_folder(tmp_path / "a", "{broken"))
    with pytest.raises(ArtifactError, match="not a tl_deploy export manifest"):
        read_export_manifest(_folder(tmp_path / "b", "[]"))
    with pytest.raises(ArtifactError, match=r"lists '\.\./x', which is not a file there"):
        read_export_manifest(_folder(tmp_path / "c", [{"file": "../x"}]))
    folder = _folder(tmp_path / "d", [{"file": "model.onnx", "sha256": "0" * 64}])
    (folder / "model.onnx").write_bytes(b"changed")
    (folder / "other.onnx").write_bytes(b"x")
    manifest = read_export_manifest(folder)
    with pytest.raises(ArtifactError, match="was modified"):
        export_file(folder, "model.onnx", manifest)
    assert export_file(folder, "model.onnx", manifest, verify=False) == folder / "model.onnx"
    with pytest.raises(ArtifactError, match="is not listed"):
        export_file(folder, "other.onnx", manifest)


def test_usable_files_and_the_written_manifest() -> None:
    files = [{"file": "model.onnx", "kind": "onnx", "status": "ok", "input_layout": names.FLOAT_NCHW},
             {"file": "model.preprocess.onnx", "kind": "onnx", "status": "ok", "input_layout": names.UINT8_NHWC},
             {"file": "model.int8.onnx", "kind": "onnx", "status": "failed"}]
    manifest = make_export_manifest(tl_deploy_version="0", source={}, metadata={}, options={}, versions={},
                                    files=files)
    assert manifest["format"] == MANIFEST_FORMAT and manifest["format_version"] == 1
    assert [f["file"] for f in usable_files(manifest["files"])] == ["model.onnx"]


def test_export_choices_are_what_load_can_pick(export_dir: Path) -> None:
    from tl_deploy.runtime import export_choices

    choices = export_choices(export_dir, tensorrt_ok=True)  # the fixture holds no engine
    assert choices == [("onnxruntime", "int8"), ("onnxruntime", "fp32")]


def test_the_app_library_reads_formats_and_runtime_only(app_export: Path) -> None:
    """The app's model list, engine switch and model card come from formats and the runtime."""
    modules = _imported_after(
        "from pathlib import Path\n"
        "from tl_deploy import app, model_card\n"
        f"model = Path({str(app_export)!r})\n"
        "assert [e.label for e in model_card.available_engines(model, tensorrt_ok=False, torch_ok=False)][:2] == "
        "['fastest available', 'ONNX Runtime INT8']\n"
        "assert model_card.read_model_card(model).files"
    )
    assert not _offending(modules, HEAVY + TRAINING_OR_EXPORT + ("tl_deploy.parity", "tl_deploy.comparison"))
