"""Loading untrusted files: nothing is unpickled, modified files are detected (and --no-verify
overrides it deliberately)."""

from __future__ import annotations

import ast
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from tl_deploy.backbones import read_state_dict
from tl_deploy.errors import ArtifactError, ModelError
from tl_deploy.export import ExportOptions, export_artifact
from tl_deploy.fileio import sha256_bytes
from tl_deploy.finetune import main
from tl_deploy.runtime import load
from tl_deploy.train.checkpoint import Checkpointer

from .conftest import TINY_MODEL
from .test_finetune import assert_one_error_line

PACKAGE = Path(__file__).resolve().parents[1] / "tl_deploy"


class Payload:
    """Unpickling this runs ``open(marker, "w")``: proof that code ran if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def test_malicious_pth_is_refused_and_never_runs(tiny_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "x": Payload(marker)}, evil)
    with pytest.raises(ModelError, match="Refusing to load"):
        read_state_dict(evil)
    rc = main(["--data", str(tiny_data), "--model", TINY_MODEL, "--weights", str(evil), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert_one_error_line(capsys.readouterr().err, "Refusing to load")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = Checkpointer(tmp_path / "run", fingerprint={"config": {"seed": 0}})
    ckpt.dir.mkdir()
    buf = io.BytesIO()
    torch.save({"model": {}, "run_state": Payload(marker)}, buf)
    (ckpt.dir / "state-finetune-1.pt").write_bytes(buf.getvalue())
    # A consistent meta (right checksum and fingerprint): only the unpickler stands in the way.
    ckpt.meta_file.write_text(json.dumps({"state": "state-finetune-1.pt", "sha256": sha256_bytes(buf.getvalue()),
                                          "fingerprint": ckpt.fingerprint}))
    with pytest.raises(ArtifactError, match="Refusing to load checkpoint"):
        ckpt.load()
    assert not marker.exists()
    ckpt.meta_file.write_text(json.dumps({"state": "../../etc/passwd", "sha256": "0", "fingerprint": {}}))
    assert ckpt.load() is None  # a meta naming a file outside the checkpoint folder is not followed


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):  # a bare call: eval(...), exec(...)
                found.append((func.id, node))
            elif isinstance(func, ast.Attribute):  # module.function(...); obj.method() gets a "?." owner
                owner = func.value.id if isinstance(func.value, ast.Name) else "?"
                found.append((f"{owner}.{func.attr}", node))
    return found


def test_library_never_unpickles_or_evaluates_loaded_data() -> None:
    """Every torch.load passes weights_only=True; no pickle/marshal/yaml.load/eval/exec anywhere, except
    datasets/animal_shape.py's restricted unpickler for the embedded Animal-Shape arrays (sha256-pinned)."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        for name, call in _calls(ast.parse(path.read_text(), str(path))):
            kwargs = {k.arg: k.value for k in call.keywords}
            if name == "torch.load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "marshal.loads", "yaml.load", "eval", "exec",
                          "dill.load", "joblib.load", "np.load", "numpy.load"):
                flag = kwargs.get("allow_pickle")
                if name.endswith("np.load") and isinstance(flag, ast.Constant) and flag.value is False:
                    continue
                problems.append(f"{rel}:{call.lineno} {name}")
            elif name.endswith("Unpickler") and rel.as_posix() != "tl_deploy/datasets/animal_shape.py":
                problems.append(f"{rel}:{call.lineno} {name}")
    assert not problems, problems


@pytest.fixture(scope="module")
def export_dir(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "export"
    export_artifact(tiny_artifact, out, ExportOptions())
    return out


def _flip_a_weight_byte(path: Path) -> None:
    """Change one weight inside the largest initializer: the graph still loads, and silently differs."""
    import onnx

    raw = max((t.raw_data for t in onnx.load(str(path)).graph.initializer), key=len)
    data = bytearray(path.read_bytes())
    at = data.find(raw) + len(raw) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_modified_export_file_is_refused(export_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    _flip_a_weight_byte(copy / "model.onnx")
    for target in (copy, copy / "model.onnx"):  # the folder, or the file next to its export.json
        with pytest.raises(ArtifactError, match=r"model.onnx was modified .*verify=False \(--no-verify\)"):
            load(target)
    assert load(copy, verify=False).backend_name == "onnxruntime"  # a deliberate override still loads
    load(export_dir)  # the untouched folder loads


def test_export_manifest_naming_files_outside_the_folder_is_refused(export_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / "export.json").read_text())
    manifest["files"][0]["file"] = "../model.onnx"
    (copy / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a file there"):
        load(copy)


def test_export_cli_no_verify_override(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tl_deploy.export.__main__ import main as export_main

    copy = tmp_path / "model"
    shutil.copytree(tiny_artifact, copy)
    (copy / "metrics.json").write_text("{}")
    assert export_main([str(copy), "--out", str(tmp_path / "e")]) == 1
    assert_one_error_line(capsys.readouterr().err, "was modified")
    assert not (tmp_path / "e").exists()
    assert export_main([str(copy), "--out", str(tmp_path / "e"), "--no-verify"]) == 0
