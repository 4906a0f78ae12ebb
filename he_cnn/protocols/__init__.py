"""Two-party protocols between S1 (compute cloud, public key only) and S2 (key cloud).

Each module holds both ends of its protocol: an S1 function that drives the rounds through a
:class:`~he_cnn.transport.channel.Channel`, and the S2 handlers that answer them (registered in
:mod:`he_cnn.parties.key_cloud`). Docstrings list the steps and what each cloud learns.
"""
