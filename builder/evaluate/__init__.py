"""Evaluation and calibration frames, accuracy, the gate and the measurements a passport holds, the comparison
with the engine a new one replaces.
"""
