"""edgevit builder: the offline side (JAX allowed).

Checkpoint in the published google-research/vision_transformer layout -> verified
ONNX export -> (later) device engines and signed bundles.
"""
