"""Lower precision: INT8 (static Q/DQ, dynamic) and FP16, SmoothQuant folded in, the INT8 recipe search,
calibration activations.
"""
