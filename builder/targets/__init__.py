"""What a runtime needs beyond ONNX: OpenVINO builds, TensorRT plans, TensorRT's parser rules checked on any
machine (mirrors agent/engine/runtimes/).
"""
