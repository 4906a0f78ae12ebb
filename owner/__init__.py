"""The data owner's side: train the ICNN, quantise it, encrypt it under the clouds' key, upload it to S1.

:mod:`owner.pipeline` holds the steps as functions (the demo and the tests call them too);
:mod:`owner.cli` is the ``he-cnn owner`` command group.
"""
