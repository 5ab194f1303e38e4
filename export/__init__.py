"""ONNX export of the student (`export.onnx_export`, needs torch) and the torch-free edge runner
(`export.edge`: onnxruntime, numpy and the featuriser). See docs/export.md."""
