"""Environment for the Python child processes that the tests start (tools, scripts): they import the
same ``dino_detr`` as the test process, however the package is installed (editable install, another
checkout, ``make test-d2-main``'s environment, which has none): its folder comes first on PYTHONPATH."""

import os

import dino_detr

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dino_detr.__file__)))


def child_env(base=None, **changes) -> dict:
    """``base`` (default ``os.environ``) with ``changes``, and ``PACKAGE_ROOT`` first on PYTHONPATH."""
    env = dict(os.environ if base is None else base, **changes)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env
