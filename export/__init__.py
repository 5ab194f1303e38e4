"""ONNX export of a published student (`export.onnx_export`, `python -m export`; needs torch).

Running the exported file (on a robot, or `agent serve --backend onnx`) is the
student contract's torch-free `agent.student.onnx.OnnxRunner`. See docs/export.md.
"""
