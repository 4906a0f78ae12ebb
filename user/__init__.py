"""The user's side: their own Paillier key pair, and classifying images without anyone else seeing them.

:mod:`user.keys` creates and reads the user's key file; :mod:`user.query` encodes, encrypts, sends and
decrypts; :mod:`user.client` is the Python client over it (``he_cnn.Client``); :mod:`user.cli` is the
``he-cnn user`` command group, a thin layer over the client.
"""
