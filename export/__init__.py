"""Exporters: ONNX graphs (``python -m export.onnx``) and TensorRT engines (``python -m export.trt``)."""
