"""The one base class of the errors that stop a run for a reason outside the code: a damaged checkpoint, a workdir held
by another live run, a filesystem that refuses a save.

Each subclass lives beside the code that raises it (`checkpoint.py`, `workdir.py`). `xmodal` prints such an error's
message alone, without a traceback (`xmodal/cli/main.py`): the message names what failed (a step, a file, a process)
and what to do next.
"""

from __future__ import annotations


class RunError(Exception):
  """A run cannot start or go on; the message says why and what to do."""
