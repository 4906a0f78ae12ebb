"""The ``he-cnn`` command: one entry point for the clouds, the owner, the user and the demo.

``he-cnn serve s1|s2`` (:mod:`he_cnn.servers.serve`), ``he-cnn owner ...`` (:mod:`he_cnn.owner.cli`),
``he-cnn user ...`` (:mod:`he_cnn.user.cli`), ``he-cnn admin user ...`` (:mod:`he_cnn.servers.admin`) and ``he-cnn demo`` (:mod:`he_cnn.servers.demo`); each has ``--help``.
Each sub-command's module is imported only when that sub-command runs: the owner's and the demo's
modules load torch and the training code (seconds), which a cloud process neither needs nor should
carry.
"""
from __future__ import annotations

import importlib

import click

#: sub-command name -> "module:attribute" of its click command
COMMANDS = {"serve": "he_cnn.servers.serve:serve", "owner": "he_cnn.owner.cli:owner",
            "user": "he_cnn.user.cli:user", "demo": "he_cnn.servers.demo:demo", "admin": "he_cnn.servers.admin:admin",
            "federate-demo": "he_cnn.servers.federate_demo:federate_demo"}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group("he-cnn", cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="he-cnn")
def main() -> None:
    """Encrypted image classification by two non-colluding clouds: nobody but you sees image, model or answer.

    \b
    Quick start:  he-cnn demo
    Deployment:   he-cnn serve s2 ...   he-cnn serve s1 ...
                  he-cnn owner upload ...   he-cnn user keygen ...   he-cnn user query ...
    """
