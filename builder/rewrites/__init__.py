"""Exact rewrites of a verified export for an engine: the class token alone in the last block, a Mixer's token
mixing for OpenVINO, graph passes.
"""
