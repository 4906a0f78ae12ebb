"""The ``he-cnn`` command: one entry point for the clouds, the owner, the user and the demo.

``he-cnn serve s1|s2`` (:mod:`servers.serve`), ``he-cnn owner ...`` (:mod:`owner.cli`),
``he-cnn user ...`` (:mod:`user.cli`) and ``he-cnn demo`` (:mod:`servers.demo`); each has ``--help``.
"""
from __future__ import annotations

import click

from owner.cli import owner
from user.cli import user

from .demo import demo
from .serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="he-cnn")
def main() -> None:
    """Encrypted image classification by two non-colluding clouds: nobody but you sees image, model or answer.

    \b
    Quick start:  he-cnn demo
    Deployment:   he-cnn serve s2 ...   he-cnn serve s1 ...
                  he-cnn owner upload ...   he-cnn user keygen ...   he-cnn user query ...
    """


main.add_command(serve)
main.add_command(owner)
main.add_command(user)
main.add_command(demo)
