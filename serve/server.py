"""The HTTP server as gunicorn's Python API runs it: the bundled settings file and serve.app:create_app().

    python -m serve.server      # what `ckpt-serve serve` execs, after setting its flags' variables

The same server as `gunicorn -c serve/gunicorn_conf.py "serve.app:create_app()"`: gunicorn_conf.py runs
as gunicorn's own -c runs a file, every gunicorn setting it defines is set (bind, workers, preload_app,
the hooks, logging), and the app is loaded from the same URI by gunicorn's own loader.

This module imports nothing of serve: gunicorn_conf.py must be the first to (it sets
PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported, see tests/test_imports.py). That is why
`ckpt-serve serve` execs a fresh interpreter here instead of running gunicorn in the process that
parsed the command line, which has imported the prediction core already.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from gunicorn import util
from gunicorn.app.base import BaseApplication

SETTINGS_FILE = Path(__file__).resolve().parent / "gunicorn_conf.py"
APP_URI = "serve.app:create_app()"


class GunicornServer(BaseApplication):
    """gunicorn with the settings of SETTINGS_FILE serving APP_URI."""

    def load_config(self) -> None:
        spec = importlib.util.spec_from_file_location("__config__", SETTINGS_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["__config__"] = module
        spec.loader.exec_module(module)
        for key, value in vars(module).items():
            if key in self.cfg.settings:
                self.cfg.set(key.lower(), value)

    def load(self):
        return util.import_app(APP_URI)


def main() -> None:
    GunicornServer(prog="ckpt-serve serve").run()


if __name__ == "__main__":
    main()
