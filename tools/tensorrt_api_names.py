"""Write the names of the TensorRT Python API, per version, from NVIDIA's real bindings wheels.

    python tools/tensorrt_api_names.py [--versions 10.16.1.11 11.4.0.106] [--out tests/data/tensorrt_api.json]

PyPI's ``tensorrt_cu12_bindings`` wheel holds only the Python module (``tensorrt_bindings/tensorrt.so``);
the native libraries (libnvinfer, libnvinfer_plugin, libnvonnxparser) come from another wheel with a
GPU driver. The module binds its classes through C++ virtual interfaces and resolves only a handful
of C entry points (``createInferBuilder_INTERNAL`` ...) from those libraries, so this script builds
empty stand-ins for them (gcc), imports the real module in a subprocess and lists every module
attribute and class member (``Builder``, ``BuilderFlag.TF32``, ``IBuilderConfig.set_flag``). Nothing
is called, so no GPU is needed.

The result is committed; ``tests/test_tensorrt_api.py`` checks tl_deploy's TensorRT code against it,
so CI needs neither the download nor gcc. Re-run it when a new TensorRT major version appears.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tensorrt_cu12_bindings"
DEFAULT_VERSIONS = ("10.16.1.11", "11.4.0.106")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tensorrt_api.json"
# Symbols the bindings take from libc/libstdc++/libpython/the loader, not from TensorRT's libraries.
_SYSTEM_PREFIXES = ("Py", "_Py", "_ITM_", "__", "dl", "pthread_")

_DUMP = r"""
import json, sys
import tensorrt_bindings as trt
names = set()
for name in dir(trt):
    if name.startswith("_"):
        continue
    names.add(name)
    value = getattr(trt, name)
    if isinstance(value, type):
        names.update(f"{name}.{member}" for member in dir(value) if not member.startswith("_"))
json.dump({"version": trt.__version__, "names": sorted(names)}, sys.stdout)
"""


def download(version: str, dest: Path) -> Path:
    """``pip download`` the bindings wheel for this Python (no dependencies, no install)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                    "--disable-pip-version-check", f"{PACKAGE}=={version}", "-d", str(dest)], check=True)
    wheels = sorted(dest.glob(f"{PACKAGE}-{version}*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip wrote no {PACKAGE}=={version} wheel into {dest}")
    return wheels[0]


def undefined_symbols(module: Path) -> list[str]:
    """The C symbols the bindings expect from TensorRT's libraries (``nm -D --undefined-only``)."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(module)], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if "@" not in n and not n.startswith(_SYSTEM_PREFIXES))


def build_stand_ins(module: Path, dest: Path) -> None:
    """Empty libraries under the names the module links to, exporting the symbols it needs."""
    needed = subprocess.run(["readelf", "-d", str(module)], capture_output=True, text=True, check=True).stdout
    libraries = [line.split("[", 1)[1].rstrip("]") for line in needed.splitlines() if "(NEEDED)" in line]
    libraries = [lib for lib in libraries if lib.startswith("libnv")]
    source = dest / "stand_in.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in undefined_symbols(module)))
    for library in libraries:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(dest / library), str(source)], check=True)


def api_names(version: str, work: Path) -> dict[str, object]:
    wheel = download(version, work)
    root = work / version
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root)
    libs = root / "stand_in_libs"
    libs.mkdir()
    build_stand_ins(root / "tensorrt_bindings" / "tensorrt.so", libs)
    proc = subprocess.run([sys.executable, "-c", _DUMP], capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "LD_LIBRARY_PATH": str(libs), "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise SystemExit(f"error: importing {PACKAGE} {version} failed: {proc.stderr.strip()[-500:]}")
    result: dict[str, object] = json.loads(proc.stdout)
    result["wheel"] = wheel.name
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS),
                        help=f"{PACKAGE} versions to list (default: {' '.join(DEFAULT_VERSIONS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file to write (default {DEFAULT_OUT})")
    args = parser.parse_args()
    apis = {}
    with tempfile.TemporaryDirectory(prefix="trt_api_") as tmp:
        for version in args.versions:
            api = api_names(version, Path(tmp))
            apis[str(api["version"])] = {"wheel": api["wheel"], "names": api["names"]}
            print(f"{api['wheel']}: {len(api['names'])} names")  # type: ignore[arg-type]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"package": PACKAGE, "script": "tools/tensorrt_api_names.py", "versions": apis},
                                  indent=0) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
