"""The neutral file-format facts every part of tl_deploy reads, each defined once.

========================  ===================================================================
``formats.names``         file names, tensor names, input layouts and precision names
``formats.metadata``      ``OnnxMetadata``: what an exported file says about itself
``formats.export_manifest`` an export folder's ``export.json``: read, check, open a listed file
``formats.engine_sidecar``  a TensorRT engine's JSON sidecar: make, read, check
========================  ===================================================================

Export writes these formats; the runtime, parity, bench and the app read them. Nothing here
imports torch, onnx or tensorrt at module level (``read_onnx_metadata`` imports onnx when called),
so the edge runtime can depend on this package alone.
"""
