"""edgevit agent: the on-device side.

Nothing in this package may import JAX or ``builder``: it must install and run on a
Jetson (or any edge box) with only ONNX Runtime / TensorRT, OpenCV and NumPy.
"""
