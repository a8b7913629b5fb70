"""The Streamlit app: the page through streamlit.testing's AppTest, and its file handling in tl_deploy.app."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_deploy import app as lib
from tl_deploy import model_card, uploads
from tl_deploy.errors import ArtifactError, DataError
from tl_deploy.runtime import load

from .conftest import TINY_CLASSES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "app" / "streamlit_app.py"


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels: what a decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def test_images(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "test").rglob("*.png"))


@pytest.fixture()
def app(app_export: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(lib.MODEL_ENV, str(app_export))
    monkeypatch.chdir(tmp_path)  # no export/ here: the page must use the model it was given
    at = AppTest.from_file(str(SCRIPT), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.value for e in at.error]


def prediction_lines(at) -> list[str]:  # type: ignore[no-untyped-def]
    return [m.value for m in at.markdown if m.value.startswith("Prediction:")]


# --- The page ------------------------------------------------------------------------------------


def test_page_loads_the_model_and_classifies_an_upload(app, app_export: Path, test_images: list[Path]) -> None:
    assert not errors(app)
    assert "onnxruntime" in app.info[0].value and "int8" in app.info[0].value  # fastest file on a CPU
    image = test_images[0]
    labels, probs = load(app_export).predict(image)
    expected = labels[0][0]
    app.file_uploader(key="images").set_value((image.name, image.read_bytes(), "image/png")).run()
    assert not app.exception and not errors(app)
    lines = prediction_lines(app)
    assert len(lines) == 1 and lines[0].startswith(f"Prediction: **{expected}** · {probs[0][0]:.1%}")


def test_bad_uploads_give_messages_and_the_page_keeps_serving(app, test_images: list[Path]) -> None:
    good = test_images[0].read_bytes()
    app.file_uploader(key="images").set_value([
        ("notes.png", b"this is not an image", "image/png"),
        ("truncated.png", good[: len(good) // 2], "image/png"),
        ("empty.png", b"", "image/png"),
        ("huge.png", png_header(20_000, 20_000), "image/png"),
        ("good.png", good, "image/png"),
    ]).run()
    assert not app.exception
    messages = errors(app)
    assert len(messages) == 4, messages
    assert "notes.png is not a readable image (unknown file format)" in messages[0]
    assert messages[1].startswith("truncated.png is not a readable image")
    assert "empty.png is empty (0 bytes)" in messages[2]
    assert messages[3].startswith("huge.png is too large") and "The app's limit is 50 MP" in messages[3]
    assert len(prediction_lines(app)) == 1  # the good image is still classified


def test_backend_switch_and_side_by_side_comparison(app, app_export: Path) -> None:
    labels = app.radio(key="engine").options
    assert labels[:3] == ["fastest available", "ONNX Runtime INT8", "ONNX Runtime FP32"] and "PyTorch" in labels
    engines = {e.label: e.key for e in model_card.available_engines(app_export, tensorrt_ok=False, torch_ok=True)}
    app.radio(key="engine").set_value(engines["ONNX Runtime FP32"]).run()
    assert "**fp32**" in app.info[0].value
    app.multiselect(key="compare").set_value([engines["ONNX Runtime INT8"], engines["PyTorch"]]).run()
    app.multiselect(key="samples").set_value([app.multiselect(key="samples").options[0]]).run()
    assert not app.exception and not errors(app)
    assert "· onnxruntime · fp32 on cpu · model.onnx" in prediction_lines(app)[0]
    table = app.dataframe[0].value
    assert list(table["backend"]) == ["ONNX Runtime FP32", "ONNX Runtime INT8", "PyTorch"]
    assert list(table["engine"].str.split(" ·").str[0]) == ["onnxruntime", "onnxruntime", "torch"]
    assert table["prediction"].iloc[0] == table["prediction"].iloc[2]  # FP32 ONNX and PyTorch agree


def test_model_choices_stay_apart_when_an_export_and_its_artifact_share_a_name(
        app_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = app_export.parent.parent  # export/tiny and models/tiny, as `make demo` leaves them
    monkeypatch.chdir(project)
    choices = model_card.model_choices(app_export.resolve())
    assert [c.path.resolve() for c in choices] == [app_export.resolve(), (project / "models" / "tiny").resolve()]
    assert len({c.key for c in choices}) == len({c.label for c in choices}) == 2
    assert [c.label for c in choices] == ["tiny (export) · export/tiny", "tiny (artifact, PyTorch) · models/tiny"]
    engines = model_card.available_engines(app_export, tensorrt_ok=False, torch_ok=True)
    assert len({e.key for e in engines}) == len(engines)


def test_page_keeps_the_chosen_model_through_reruns(app_export: Path, monkeypatch: pytest.MonkeyPatch,
                                                    test_images: list[Path]) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(app_export.parent.parent)
    monkeypatch.setenv(lib.MODEL_ENV, str(app_export))
    at = AppTest.from_file(str(SCRIPT), default_timeout=300).run()
    assert at.selectbox(key="model").value == f"export:{app_export.resolve()}"
    at.file_uploader(key="images").set_value((test_images[0].name, test_images[0].read_bytes(), "image/png")).run()
    assert at.selectbox(key="model").value == f"export:{app_export.resolve()}"
    assert "onnxruntime" in at.info[0].value and "· onnxruntime · int8" in prediction_lines(at)[0]


def test_batch_zip_gives_accuracy_and_confusion(app, app_export: Path, test_images: list[Path]) -> None:
    entries = {f"set/{p.parent.name}/{p.name}": p.read_bytes() for p in test_images}
    entries["set/readme.txt"] = b"not an image, skipped"
    entries["set/circle/broken.png"] = b"junk"
    app.file_uploader(key="zip").set_value(("set.zip", zip_bytes(entries), "application/zip")).run()
    app.button(key="run_batch").click().run()
    assert not app.exception and not errors(app)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["images"] == str(len(test_images) + 1) and metrics["unreadable"] == "1"
    shown = f"Classified {len(test_images) + 1} images on onnxruntime · int8 on cpu · "
    assert any(c.value.startswith(shown) for c in app.caption), [c.value for c in app.caption]
    labels, _ = load(app_export).predict(test_images)
    truth = [p.parent.name for p in test_images]
    accuracy = np.mean([lab[0] == t for lab, t in zip(labels, truth)])
    assert metrics[f"accuracy ({len(test_images)} labelled)"] == f"{accuracy:.2%}"
    confusion = app.dataframe[1].value
    assert list(confusion.columns) == TINY_CLASSES and int(confusion.to_numpy().sum()) == len(test_images)


def test_zip_with_escaping_paths_is_refused_and_nothing_is_written(app, tmp_path: Path) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    data = zip_bytes({"ok/circle/1.png": png_bytes(Image.new("L", (8, 8))), "../../x.png": b"payload"})
    app.file_uploader(key="zip").set_value(("evil.zip", data, "application/zip")).run()
    assert not app.exception
    assert any("'../../x.png' points outside the archive" in m for m in errors(app))
    assert not (tmp_path / "x.png").exists() and not any(work.iterdir())


def test_model_card_shows_parity_report_when_present(app_export: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(lib.MODEL_ENV, str(app_export))
    at = AppTest.from_file(str(SCRIPT), default_timeout=300).run()
    assert any("None next to this model" in c.value for c in at.caption)
    export = tmp_path / "export" / "copy"
    shutil.copytree(app_export, export)
    report = tmp_path / "export" / "copy.parity-test.md"  # where python -m tl_deploy.parity writes it
    report.write_text("| backend | agreement |\n| --- | --- |\n| ONNX FP32 | 100% |\n")
    monkeypatch.setenv(lib.MODEL_ENV, str(export))
    at = AppTest.from_file(str(SCRIPT), default_timeout=300).run()
    assert not at.exception
    assert any("| ONNX FP32 | 100% |" in m.value for m in at.markdown)
    assert any(m.value == "**Classes (3):** " + ", ".join(TINY_CLASSES) for m in at.markdown)


def test_page_without_any_model_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(lib.MODEL_ENV, raising=False)
    at = AppTest.from_file(str(SCRIPT), default_timeout=300).run()
    assert not at.exception
    assert "No model found" in errors(at)[0] and "make demo" in errors(at)[0]


# --- The library -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_read_image_converts_every_mode_to_rgb(mode: str) -> None:
    base = Image.new("RGB", (6, 4), (200, 100, 50))
    image = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (6, 4), 3000)
    fmt = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    out = uploads.read_image(png_bytes(image, fmt), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (6, 4)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF"])
def test_read_image_formats(fmt: str) -> None:
    out = uploads.read_image(png_bytes(Image.new("RGB", (9, 7), (0, 255, 0)), fmt), f"x.{fmt.lower()}")
    assert out.size == (9, 7) and out.getpixel((4, 3))[1] > 200


def test_read_image_refuses_large_images_before_decoding() -> None:
    with pytest.raises(DataError, match=r"big.png is too large: 1000x1000 pixels \(1 MP\). The app's limit is 0.5 MP"):
        uploads.read_image(png_header(1000, 1000), "big.png", max_pixels=500_000)
    with pytest.raises(DataError, match="bomb.png is too large: .* The app's limit is 50 MP; downscale it first"):
        uploads.read_image(png_header(20_000, 20_000), "bomb.png")


@pytest.mark.parametrize("name", ["../../x.png", "/etc/x.png", "a/../../x.png", "C:/x.png", "..\\x.png"])
def test_read_zip_refuses_escaping_names(name: str) -> None:
    with pytest.raises(DataError, match="points outside the archive"):
        uploads.read_zip(zip_bytes({"ok.png": b"1", name: b"2"}), TINY_CLASSES)


def test_read_zip_limits_and_labels() -> None:
    data = zip_bytes({"d/circle/a.png": b"1" * 10, "d/other/b.png": b"2" * 10, "__MACOSX/d/._a.png": b"",
                      "d/.hidden.png": b"", "d/notes.txt": b"x"})
    items = uploads.read_zip(data, TINY_CLASSES)
    assert [(i.name, i.true_label) for i in items] == [("d/circle/a.png", "circle"), ("d/other/b.png", None)]
    with pytest.raises(DataError, match="more than 1 images"):
        uploads.read_zip(data, TINY_CLASSES, max_files=1)
    with pytest.raises(DataError, match="expands to more than"):
        uploads.read_zip(zip_bytes({"a.png": b"\0" * (2 << 20)}), TINY_CLASSES, max_bytes=1 << 20)
    with pytest.raises(DataError, match="Not a readable zip"):
        uploads.read_zip(b"PK nonsense", TINY_CLASSES)
    with pytest.raises(DataError, match="No images"):
        uploads.read_zip(zip_bytes({"a.txt": b"x"}), TINY_CLASSES)


def test_scan_folder_and_classify_items(app_export: Path, tiny_data: Path, tmp_path: Path) -> None:
    items = uploads.scan_folder(tiny_data / "test", TINY_CLASSES, roots=[tiny_data])
    assert len(items) == 24 and {i.true_label for i in items} == set(TINY_CLASSES)
    items.append(uploads.ImageItem("bad.png", b"junk", "circle"))
    clf = load(app_export, precision="fp32")
    seen: list[tuple[int, int]] = []
    result = uploads.classify_items(clf, items, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (25, 25) and result.errors == 1 and result.labelled == 24
    labels, _ = clf.predict([i.source for i in items[:-1]])
    assert [r["prediction"] for r in result.rows[:-1]] == [lab[0] for lab in labels]
    csv_lines = result.to_csv().splitlines()
    assert csv_lines[0] == "image,prediction,confidence,true_label,correct,error" and len(csv_lines) == 26
    with pytest.raises(DataError, match="Folder not found"):
        uploads.scan_folder(tmp_path / "missing", TINY_CLASSES)


def test_finding_models_and_engines(app_export: Path, tmp_path: Path) -> None:
    project = app_export.parent.parent
    assert model_card.default_model(project / "export", project / "models") == app_export
    assert model_card.default_model(tmp_path / "export", project / "models") == project / "models" / "tiny"
    with pytest.raises(ArtifactError, match="No model found.*make demo"):
        model_card.default_model(tmp_path / "export", tmp_path / "models")
    engines = model_card.available_engines(app_export, tensorrt_ok=False, torch_ok=False)
    assert [(e.backend, e.precision) for e in engines] == [("auto", "auto"), ("onnxruntime", "int8"),
                                                          ("onnxruntime", "fp32")]
    card = model_card.read_model_card(app_export)
    assert card.artifact == project / "models" / "tiny" and card.metrics["test_acc"] == 0.5
    assert card.parity_markdown is None and [f["file"] for f in card.files][0] == "model.onnx"
    assert len(model_card.sample_gallery(card, TINY_CLASSES, per_class=2)) == 6


def test_launcher(app_export: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    args = lib.streamlit_args(app_export, 8600, "127.0.0.1", [tiny_data])
    assert args[:2] == ["run", str(SCRIPT)]
    assert args[2:] == ["--server.address", "127.0.0.1", "--server.port", "8600", "--", "--model", str(app_export),
                        "--data-root", str(tiny_data)]
    assert lib.main(["--model", "/nonexistent/model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Model not found: /nonexistent/model.") and "Traceback" not in err
    assert lib.main(["--model", str(app_export), "--data-root", "/nonexistent/data"]) == 1
    assert capsys.readouterr().err.startswith("error: --data-root /nonexistent/data is not a folder")

    served: list[list[str]] = []
    monkeypatch.setattr(lib, "serve", lambda args: served.append(list(args)) or 0)
    assert lib.main(["--model", str(app_export)]) == 0  # loopback unless asked: no warning
    assert served[-1][2:4] == ["--server.address", "127.0.0.1"] and "warning" not in capsys.readouterr().err
    assert lib.get_args_parser().parse_args([]).address == "127.0.0.1"
    assert lib.main(["--model", str(app_export), "--address", "0.0.0.0"]) == 0
    assert served[-1][2:4] == ["--server.address", "0.0.0.0"]
    assert "warning: serving on 0.0.0.0, not only this machine" in capsys.readouterr().err
    assert lib.is_loopback("::1") and lib.is_loopback("localhost") and not lib.is_loopback("192.168.1.4")


def test_launcher_warms_the_model_the_page_opens_on(app_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lib, "serve", lambda args: 0)
    monkeypatch.setattr(model_card, "_WARMED", {})
    assert lib.main(["--model", str(app_export)]) == 0
    [(path, backend, precision, _)] = model_card._WARMED
    assert (path, backend, precision) == (str(app_export.resolve()), "auto", "auto")
    warmed = next(iter(model_card._WARMED.values()))
    assert model_card.load_warm(app_export, "auto", "auto") is warmed and not model_card._WARMED  # taken once


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_the_server(app_export: Path, tmp_path: Path, sig: signal.Signals) -> None:
    port = lib.free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "tl_deploy.app", "--model", str(app_export), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        lib.wait_until_serving(f"http://127.0.0.1:{port}", proc, timeout=300)
        os.kill(proc.pid, sig)  # the launcher only, as a service manager or Ctrl+C does
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # nothing of the launcher's session keeps running or serving
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# --- Server folders: only under the data roots -------------------------------------------------


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "test" / "circle").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "test" / "circle" / "a.png")
    outside = tmp_path / "secret"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "b.png")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


def test_server_folder_inside_the_roots(data_root: Path) -> None:
    assert uploads.resolve_server_folder("test", [data_root]) == (data_root / "test").resolve()
    assert uploads.resolve_server_folder(str(data_root / "test"), [data_root]) == (data_root / "test").resolve()
    assert uploads.resolve_server_folder(str(data_root), [data_root]) == data_root.resolve()
    items = uploads.scan_folder(data_root, TINY_CLASSES, roots=[data_root])
    assert [i.name for i in items] == ["test/circle/a.png"]  # the folder link out is not followed


@pytest.mark.parametrize("typed", ["../secret", "test/../../secret", "/usr/share", "/", "escape", "escape/"])
def test_server_folder_escapes_are_refused(data_root: Path, typed: str) -> None:
    with pytest.raises(DataError, match=r"contains '\.\.'|outside the data roots"):
        uploads.resolve_server_folder(typed, [data_root])


def test_server_folders_need_a_root_and_file_links_out_refuse_the_folder(data_root: Path) -> None:
    with pytest.raises(DataError, match="No server folders are open.*--data-root DIR"):
        uploads.resolve_server_folder("test", [])
    (data_root / "test" / "circle" / "link.png").symlink_to(data_root.parent / "secret" / "b.png")
    with pytest.raises(DataError, match="link.png links outside the data roots"):
        uploads.scan_folder(data_root / "test", TINY_CLASSES, roots=[data_root])


def test_server_folder_walk_is_bounded_while_it_runs(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"d{i:02d}").mkdir()
        for j in range(30):
            (tmp_path / f"d{i:02d}" / f"{j}.txt").write_bytes(b"")
    seen: list[str] = []
    real_walk = os.walk

    def counting_walk(*args, **kwargs):  # type: ignore[no-untyped-def]
        for entry in real_walk(*args, **kwargs):
            seen.append(entry[0])
            yield entry

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "walk", counting_walk)
        with pytest.raises(DataError, match="holds more than 100 files and folders"):
            uploads.scan_folder(tmp_path, TINY_CLASSES, max_entries=100)
    assert len(seen) < 10  # stopped early, not after listing all 31 folders
    with pytest.raises(DataError, match="More than 2 images"):
        uploads.scan_folder(data_dir_with_images(tmp_path / "imgs", 5), TINY_CLASSES, max_files=2)


def data_dir_with_images(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (4, 4)).save(root / f"{i}.png")
    return root


def test_page_reads_server_folders_only_under_the_data_roots(app_export: Path, data_root: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(data_root.parent)
    monkeypatch.setenv(lib.MODEL_ENV, str(app_export))
    monkeypatch.setenv(lib.DATA_ROOTS_ENV, str(data_root))
    at = AppTest.from_file(str(SCRIPT), default_timeout=300).run()
    at.radio(key="batch_source").set_value("folder on the server").run()
    for typed in ("/usr/share", "../secret", "escape"):
        at.text_input(key="folder_path").set_value(typed).run()
        assert not at.exception
        assert any("outside the data roots" in m or "contains '..'" in m for m in errors(at)), typed
        assert not at.button  # nothing to classify
    at.text_input(key="folder_path").set_value("test").run()
    assert not errors(at) and at.button(key="run_batch").label == "Classify 1 images"


def test_page_offers_no_server_folders_without_a_root(tiny_artifact: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(tmp_path)
    assert "data" not in json.loads((tiny_artifact / "config.json").read_text())["training"]  # no data folder
    monkeypatch.setenv(lib.MODEL_ENV, str(tiny_artifact))
    monkeypatch.delenv(lib.DATA_ROOTS_ENV, raising=False)
    at = AppTest.from_file(str(SCRIPT), default_timeout=300).run()
    assert not at.exception and not errors(at), errors(at)
    assert at.radio(key="batch_source").options == ["zip file", "folder (upload)"]
    assert any("none open" in c.value for c in at.caption)


def test_upload_cap_is_in_the_apps_config() -> None:
    import tomllib

    config = tomllib.loads((SCRIPT.parent / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == 50 and config["browser"]["gatherUsageStats"] is False
