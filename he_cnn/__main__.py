"""``python -m he_cnn ...`` is the ``he-cnn`` command (useful where the console script is not on PATH)."""
from he_cnn.servers.cli import main

if __name__ == "__main__":
    main(prog_name="he-cnn")
