"""Checkpoint -> verified ONNX: reading the published layout, the architectures and their JAX models, resolution
changes, the export itself, graph tidying, verification against JAX.
"""
