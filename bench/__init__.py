"""The he-cnn benchmark (``python -m bench.bench`` from the repository root; see ``bench/README.md``).

Not part of the installed package: it measures the engine from outside, through the hooks the
parties offer (:mod:`he_cnn.trace`), and imports nothing the engine does not export.
"""
