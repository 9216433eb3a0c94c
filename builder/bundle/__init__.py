"""The engine job (candidates, measurement, choice), the manifest and passport document, the signed writer, keys,
archives, and inspect's view.
"""
