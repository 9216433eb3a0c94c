"""Demo models with real accuracy: a small ViT and Mixer trained on scikit-learn's digits.

No pretrained weights can be downloaded where edgevit is built and tested, so the
project trains its own, reproducibly, on a real labelled image set that ships inside
a package, and commits the resulting checkpoints in the published layout.
"""
