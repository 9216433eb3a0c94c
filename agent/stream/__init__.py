"""camera -> preprocess -> batch -> engine -> results: the per-frame data path and its metrics."""
