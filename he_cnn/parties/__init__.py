"""The two clouds' engines, not their web apps: S1's runner over the typed graph
(:mod:`.compute_cloud`) and S2's key cloud that answers protocol rounds (:mod:`.key_cloud`). The Flask
services around them are :mod:`he_cnn.servers`."""
