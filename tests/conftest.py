"""Makes the tools' own modules (``tools/*.py``: the scripts and their helpers, such as
``visualization``) importable by the tests, as they are for a script run from ``tools/``."""
import os
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
