"""he-cnn: encrypted image classification with the patent's Inception CNN over Paillier.

Two non-colluding clouds run the secure functions SCVL, SMAP, SACT and SCT on encrypted images and
encrypted weights; only the user decrypts the class vector. See docs/architecture.md.
"""

__version__ = "0.1.0"
