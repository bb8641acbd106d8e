"""The core import stays lean: listing recipes or validating one must not load torch."""

import subprocess
import sys


def test_cli_and_registry_do_not_import_torch():
    code = "import sys, modelpress.cli.main, modelpress.compressors.registry; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
