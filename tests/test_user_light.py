"""The user's client stays light: ``he-cnn user keygen`` and ``he-cnn user query`` load neither torch nor
scikit-learn (seconds of start-up, hundreds of MB), only numpy, Pillow, gmpy2 and requests."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "sklearn")


@pytest.mark.parametrize("code", [
    # the modules behind the user's commands, as the he-cnn command's lazy group imports them
    "import he_cnn.user.query, he_cnn.user.keys, he_cnn.user.cli",
    "from he_cnn.servers.cli import main; main(['user', '--help'], standalone_mode=False)",
    "from he_cnn.servers.cli import main; main(['user', 'query', '--help'], standalone_mode=False)",
    "from he_cnn.servers.cli import main; main(['user', 'keygen', '--help'], standalone_mode=False)",
])
def test_user_commands_import_neither_torch_nor_sklearn(code):
    check = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_reading_an_image_imports_neither_torch_nor_sklearn(tmp_path):
    """Loading, resizing and quantising the user's image (the query's first step) is numpy and Pillow only."""
    check = ("import sys, numpy as np\n"
             "from PIL import Image\n"
             "from he_cnn.user.query import Preprocessing\n"
             f"path = {str(tmp_path / 'photo.png')!r}\n"
             "Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(40, 30)).save(path)\n"
             "print(Preprocessing(16, 16, input_max=15).encode(path).shape)\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(1,", "16,", "16)", "[]"]
