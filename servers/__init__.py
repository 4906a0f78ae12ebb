"""The two clouds as HTTP services: S1 (compute, public key only) and S2 (key cloud), plus the ``he-cnn`` CLI.

Each cloud is a Flask app built by ``create_app(config)`` (:mod:`servers.s1`, :mod:`servers.s2`) and
served by waitress (:mod:`servers.serve`); :mod:`servers.cli` is the one console script that starts
them and reaches the owner's and the user's commands; :mod:`servers.demo` runs the whole service on
localhost in one command.
"""
