"""Where a command's lines go: xmodal's own and the libraries' warnings on the console, every INFO in WORKDIR/log.txt.

`logging_to` is the one place xmodal configures logging; `xmodal train`, `eval`, `bench` and `config` run inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import NoReturn


LOG_FILE = 'log.txt'  # in the workdir: every log line of every library, appended
_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'


class _ConsoleHandler(logging.Handler):
  """Writes to the current sys.stderr through tqdm, so a line lands above the progress bars instead of inside one."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class _LogFile(logging.FileHandler):
  """Appends to a file opened (its folder made) at the first record: a command stopped by its config makes no folder."""

  def __init__(self, path: pathlib.Path):
    super().__init__(path, mode='a', encoding='utf-8', delay=True)
    self.setFormatter(logging.Formatter(_FORMAT))

  def _open(self):
    pathlib.Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
    return super()._open()


def _ours_or_warning(record: logging.LogRecord) -> bool:
  """The console's filter: xmodal's own lines at any level, anything else from WARNING up."""
  return record.levelno >= logging.WARNING or record.name == 'xmodal' or record.name.startswith('xmodal.')


@contextlib.contextmanager
def logging_to(log_file: pathlib.Path | None, verbose: bool = False) -> Iterator[None]:
  """The one place xmodal configures logging, for the length of a command.

  Console (stderr): xmodal's lines, and warnings and errors from any library; `verbose` adds every library's INFO.
  `log_file` (appended, with timestamps and logger names): every INFO line, xmodal's and the libraries' (absl,
  orbax, tensorflow, tfds, jax). absl's records reach the root logger like any other, through its 'absl' logger; its
  own stderr handler stays off. TensorFlow's C++ INFO is silenced unless `verbose` or TF_CPP_MIN_LOG_LEVEL is set
  (its oneDNN notice is not: TensorFlow prints it whatever the level).
  """
  if not verbose:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # read when TensorFlow loads: xmodal.data imports it later
  root = logging.getLogger()
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    root.removeHandler(absl_logging.get_absl_handler())
  except ImportError:
    pass
  console = _ConsoleHandler()
  console.setFormatter(logging.Formatter(_FORMAT, datefmt='%H:%M:%S'))
  if not verbose:
    console.addFilter(_ours_or_warning)
  handlers: list[logging.Handler] = [console]
  if log_file is not None:
    handlers.append(_LogFile(log_file))
  level = root.level
  root.setLevel(logging.INFO)
  for handler in handlers:
    root.addHandler(handler)
  try:
    yield
  finally:
    for handler in handlers:
      root.removeHandler(handler)
      handler.close()
    root.setLevel(level)


def exit_now(code: int) -> NoReturn:
  """Ends the process with `code` after flushing and closing every log handler and the standard streams, without the
  interpreter's teardown (atexit callbacks, finalisers): for when a thread is stuck where teardown would wait on it."""
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(code)  # pylint: disable=protected-access
