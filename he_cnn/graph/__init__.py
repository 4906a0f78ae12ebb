"""The integer model: the layer catalogue (:mod:`.layers`, one class per layer kind), the typed graph
with its public spec and file (:mod:`.integer_model`), the plaintext reference (:mod:`.reference`), and
the checked readers of untrusted JSON values they share (:mod:`.parse`), and the model's public privacy
card (:mod:`.privacy`: trained with DP or not, its ε and δ). No torch here."""
