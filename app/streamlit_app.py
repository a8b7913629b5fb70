"""Classify target-domain images in the browser on the exported model.

``streamlit run app/streamlit_app.py [-- --model PATH]`` or ``python -m tl_deploy.app [--model PATH]``.
Without a model it loads the newest export under export/ (or $TL_DEPLOY_MODEL). The Batch tab reads
server folders only under --data-root DIR (or $TL_DEPLOY_DATA_ROOTS; default: the model's training
data). The page only lays out widgets: models run through ``tl_deploy.runtime``; file handling lives
in ``tl_deploy.app``.
Settings (upload size cap, no telemetry) are in app/.streamlit/config.toml.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from tl_deploy import app as lib
from tl_deploy import model_card as cards
from tl_deploy import uploads as reading
from tl_deploy.errors import TlDeployError
from tl_deploy.preprocess import denormalize, prepare
from tl_deploy.runtime import Classifier

st.set_page_config(page_title="tl_deploy: classify images", layout="wide")


def page_args() -> argparse.Namespace:
    """--model and --data-root after `--` on the streamlit command line, else $TL_DEPLOY_MODEL and
    $TL_DEPLOY_DATA_ROOTS."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data-root", action="append", default=None, dest="data_roots")
    args, _ = parser.parse_known_args(sys.argv[1:])
    args.model = args.model or os.environ.get(lib.MODEL_ENV) or None
    if args.data_roots is None and os.environ.get(lib.DATA_ROOTS_ENV):
        args.data_roots = os.environ[lib.DATA_ROOTS_ENV].split(os.pathsep)
    return args


@st.cache_resource(show_spinner="Loading the model...", max_entries=8)
def get_classifier(path: str, backend: str, precision: str, mtime: float) -> Classifier:
    """Loaded once per (model, backend, precision, file time) and shared by every session; the launcher's
    warmed one when it matches."""
    return cards.load_warm(Path(path), backend, precision)  # type: ignore[no-any-return]


def predict_timed(classifier: Classifier, image: object, top_k: int) -> tuple[list[str], np.ndarray, float]:
    start = time.perf_counter()
    labels, probs = classifier.predict(image, top_k=top_k)  # type: ignore[arg-type]
    return labels[0], probs[0], (time.perf_counter() - start) * 1000.0


# --- Sidebar: model and engine -----------------------------------------------------------------
# Every choice is a string key unique by construction (kind + resolved folder; backend + precision +
# folder), so a value coming back from the browser can only mean the entry that was shown.

st.title("Classify images")
trt_ok, ort_gpu, torch_ok = cards.backends_here()
openvino_ok = cards.openvino_here()
args = page_args()
choices = {c.key: c for c in cards.model_choices(Path(args.model) if args.model else None)}
if not choices:
    try:
        cards.default_model()
    except TlDeployError as exc:
        st.error(str(exc))
    st.stop()

with st.sidebar:
    st.header("Model")
    model_key = st.selectbox("Model", list(choices), format_func=lambda k: choices[k].label, key="model",
                             help="The model given at start first, then exports under export/ and artifacts "
                                  "under models/; start with --model PATH for another.")
    model_path = choices[model_key].path
    try:
        engines = {e.key: e for e in cards.available_engines(model_path, tensorrt_ok=trt_ok, torch_ok=torch_ok,
                                                                openvino_ok=openvino_ok)}
    except TlDeployError as exc:
        st.error(str(exc))
        st.stop()
    engine = engines[st.radio("Backend", list(engines), format_func=lambda k: engines[k].label, key="engine")]
    compare_keys = st.multiselect("Compare with", [k for k in engines if k != engine.key],
                                  format_func=lambda k: engines[k].label, key="compare",
                                  help="Run every image on these backends too, side by side.")
    found = [name for name, ok in (("TensorRT", trt_ok), ("ONNX Runtime CUDA", ort_gpu), ("PyTorch", torch_ok)) if ok]
    st.caption("Available here: " + ", ".join(found + ["ONNX Runtime CPU"] + ["OpenVINO CPU"] * openvino_ok))
    st.caption(f"Uploads up to {st.get_option('server.maxUploadSize')} MB each; images up to "
               f"{reading.MAX_IMAGE_PIXELS / 1e6:g} MP.")

try:
    clf = get_classifier(str(engine.path.resolve()), engine.backend, engine.precision, cards.model_stamp(engine.path))
except TlDeployError as exc:
    st.error(f"Could not load {engine.path} ({engine.label}): {exc}")
    st.stop()
others = []
for other in (engines[k] for k in compare_keys if k in engines):
    try:
        others.append((other, get_classifier(str(other.path.resolve()), other.backend, other.precision,
                                             cards.model_stamp(other.path))))
    except TlDeployError as exc:
        st.warning(f"{other.label} not available: {exc}")

st.info(f"Running **{clf.backend_name}** · **{clf.precision}** on {clf.device} · `{Path(clf.source).name}` "
        f"from `{model_path}` · {len(clf.class_names)} classes")
card = cards.read_model_card(model_path)
data_roots = [Path(r) for r in args.data_roots] if args.data_roots is not None else cards.default_data_roots(card)
top_k = min(5, len(clf.class_names))

tab_single, tab_batch, tab_card = st.tabs(["Classify", "Batch", "Model card"])

# --- Single images -----------------------------------------------------------------------------
# Fragments: an upload or a toggle reruns only its own section, not the sidebar, the model card or
# the other tab.


@st.fragment
def classify_section(clf: Classifier, engine: cards.Engine, others: list[tuple[cards.Engine, Classifier]]) -> None:
    uploads = st.file_uploader("Images", type=list(reading.UPLOAD_TYPES), accept_multiple_files=True, key="images",
                               help="PNG, JPEG, WebP, BMP...; any colour mode (greyscale, palette, alpha, "
                                    "16-bit, CMYK).")
    gallery = cards.sample_gallery(card, clf.class_names)
    picked: list[str] = []
    if gallery:
        picked = st.multiselect(f"Or samples of the test split ({len(gallery)})", [item.name for item in gallery],
                                key="samples")
        if st.toggle("Show the samples", key="show_gallery"):  # off by default: keeps the first page light
            st.image([str(item.source) for item in gallery], caption=[item.name for item in gallery], width=64)
    show_input = st.toggle("Show what the engine saw (after resize and crop)", key="show_input")

    items = [reading.ImageItem(f.name, f.getvalue()) for f in uploads or []]
    items += [item for item in gallery if item.name in picked]
    if not items:
        st.caption("Upload images or pick samples to classify them.")
    produced_by = cards.engine_text(clf)
    for item in items:
        st.divider()
        try:
            image = reading.read_image(item.source, item.name)
            top, probs, ms = predict_timed(clf, image, top_k)
        except TlDeployError as exc:
            st.error(str(exc))
            continue
        left, right = st.columns([1, 2])
        with left:
            st.image(image, caption=item.name, width=160)
            if show_input:
                seen = denormalize(prepare(image, clf.spec), clf.spec)  # (H, W, 3) uint8
                st.image(seen, caption=f"engine input {seen.shape[1]}x{seen.shape[0]}", width=160)
        with right:
            truth = f" (true: {item.true_label})" if item.true_label else ""
            st.markdown(f"Prediction: **{top[0]}** · {probs[0]:.1%} · {ms:.1f} ms · {produced_by}{truth}")
            chart = pd.DataFrame({"class": top, "probability": probs.astype(float)})
            st.bar_chart(chart, x="class", y="probability", horizontal=True, sort="-probability", height=180)
            if others:
                rows = [{"backend": engine.label, "engine": produced_by, "prediction": top[0],
                         "probability": float(probs[0]), "ms": round(ms, 2)}]
                for other, other_clf in others:
                    o_top, o_probs, o_ms = predict_timed(other_clf, image, 1)
                    rows.append({"backend": other.label, "engine": cards.engine_text(other_clf),
                                 "prediction": o_top[0], "probability": float(o_probs[0]), "ms": round(o_ms, 2)})
                st.dataframe(pd.DataFrame(rows), hide_index=True)


# --- Batch -------------------------------------------------------------------------------------


@st.fragment
def batch_section(clf: Classifier, engine: cards.Engine, data_roots: list[Path]) -> None:
    sources = ["zip file", "folder (upload)"] + (["folder on the server"] if data_roots else [])
    source = st.radio("Images from", sources, horizontal=True, key="batch_source")
    if not data_roots:
        st.caption("Folders on the server: none open (the operator starts the app with --data-root DIR).")
    batch_items: list[reading.ImageItem] | None = None
    try:
        if source == "zip file":
            archive = st.file_uploader("Zip of images (class folders give accuracy)", type=["zip"], key="zip")
            if archive is not None:
                batch_items = reading.read_zip(archive.getvalue(), clf.class_names)
        elif source == "folder (upload)":
            files = st.file_uploader("Folder of images", type=list(reading.UPLOAD_TYPES),
                                     accept_multiple_files="directory", key="folder_upload")
            if files:
                batch_items = reading.items_from_names([(f.name, f.getvalue()) for f in files], clf.class_names)
        else:
            roots_text = ", ".join(f"`{r}`" for r in data_roots)
            folder = st.text_input("Folder path", key="folder_path",
                                   help=f"Under the data roots only ({roots_text}); read, never written. "
                                        "Class folders (e.g. test) give accuracy.")
            st.caption(f"Data roots: {roots_text}")
            if folder:
                resolved = reading.resolve_server_folder(folder, data_roots)
                batch_items = reading.scan_folder(resolved, clf.class_names, roots=data_roots)
    except TlDeployError as exc:
        st.error(str(exc))
    if batch_items:
        key = (source, len(batch_items), engine.key)
        if st.button(f"Classify {len(batch_items)} images", key="run_batch"):
            bar = st.progress(0.0, text="Classifying...")
            result = reading.classify_items(
                clf, batch_items, progress=lambda done, total: bar.progress(done / total, text=f"{done}/{total}"))
            st.session_state["batch"] = (key, cards.engine_text(clf), result)
        stored = st.session_state.get("batch")
        if stored and stored[0] == key:
            _, produced_by, result = stored
            st.caption(f"Classified {len(result.rows)} images on {produced_by}")
            cols = st.columns(4)
            cols[0].metric("images", len(result.rows))
            cols[1].metric("unreadable", result.errors)
            cols[2].metric("images/s", f"{len(result.rows) / max(result.seconds, 1e-9):.0f}")
            if result.accuracy is not None:
                cols[3].metric(f"accuracy ({result.labelled} labelled)", f"{result.accuracy:.2%}")
            st.dataframe(pd.DataFrame(result.rows), hide_index=True)
            st.download_button("Download CSV", result.to_csv(), file_name="predictions.csv", mime="text/csv",
                               on_click="ignore")
            if result.confusion is not None:
                st.markdown("Confusion matrix (rows: true class, columns: prediction)")
                st.dataframe(pd.DataFrame(result.confusion, index=result.class_names, columns=result.class_names))


with tab_single:
    classify_section(clf, engine, others)
with tab_batch:
    batch_section(clf, engine, data_roots)

# --- Model card --------------------------------------------------------------------------------

with tab_card:
    st.subheader(card.architecture or clf.metadata.architecture)
    st.markdown(f"**Classes ({len(clf.class_names)}):** " + ", ".join(clf.class_names))
    # The classifier's own spec (the one every upload is prepared with), each value with its recorded origin.
    st.markdown(f"**Input:** {clf.spec.channel_order}, {clf.spec.describe()}")
    if card.training:
        keys = ("strategy", "epochs", "probe_epochs", "img_size", "native_size", "lr", "batch_size", "weights", "data")
        st.markdown("**Training:** " + ", ".join(f"{k} {card.training[k]}" for k in keys if k in card.training))
    if card.metrics:
        st.markdown("**Training metrics**")
        st.dataframe(pd.DataFrame([card.metrics]), hide_index=True)
    if card.files:
        st.markdown(f"**Export formats** (exported {card.created})")
        table = [{"format": f.get("format"), "file": f.get("file"), "precision": f.get("precision"),
                  "size MB": round(f.get("size_bytes", 0) / 1e6, 2), "status": f.get("status"),
                  "check": f.get("check", "")} for f in card.files]
        st.dataframe(pd.DataFrame(table), hide_index=True)
    st.markdown("**Parity report**")
    if card.parity_markdown:
        st.markdown(card.parity_markdown)
    elif card.parity_json is not None:
        st.json(card.parity_json, expanded=False)
    else:
        st.caption("None next to this model: run `python -m tl_deploy.parity MODEL_DIR --export EXPORT_DIR`.")
    if card.artifact is not None:
        plots = [card.artifact / name for name in ("curves.png", "confusion.png") if (card.artifact / name).is_file()]
        if plots:
            st.image([str(p) for p in plots], caption=[p.stem for p in plots], width=360)
