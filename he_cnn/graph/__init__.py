"""The integer model: the layer catalogue (:mod:`.layers`, one class per layer kind), the typed graph
with its public spec and file (:mod:`.integer_model`), the plaintext reference (:mod:`.reference`), and
the checked readers of untrusted JSON values they share (:mod:`.parse`). No torch here."""
