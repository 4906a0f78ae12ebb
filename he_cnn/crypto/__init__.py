"""The cryptography: Paillier keys and signed encoding (:mod:`.paillier`), DGK keys for comparisons
(:mod:`.dgk`), and the encrypted tensor (:mod:`.tensor`). No protocol and no party lives here."""
