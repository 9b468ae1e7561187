"""Bad input, named: the errors the data package raises, and the wording of its skip counts.

TensorFlow-free, so that the CLI and the training loop can catch and print them without loading it. The faults and
what each does are listed in docs/data.md, "Bad data".
"""

from __future__ import annotations


class DataError(RuntimeError):
  """Input that cannot be trained or evaluated on; the message names the source and the file, key or line."""


class UnusableSourceError(DataError):
  """A source that yields nothing usable: `data.unusable_limit` records in a row, a whole shard or a whole epoch."""


class ReaderError(DataError):
  """A shard or file that cannot be read (corrupted, or not what the config says it is): names it and the offset."""


class ImageIdCollisionError(DataError):
  """Different images under one image id: they would be each other's contrastive (ITC) positives."""


class InputInterrupted(Exception):
  """A stop (SIGTERM, SIGINT) was requested while the input pipeline had no batch ready."""


# Records skipped by the pipelines (each a record of the source: an image with its captions).
RECORD_SKIPS = {'bad_image': 'bad image', 'empty_caption': 'no usable caption', 'truncated': 'truncated'}
# Lines of a folder source's captions file, counted once when the file is read.
FILE_COUNTS = {'malformed_row': 'malformed row skipped', 'bad_caption': 'null or non-string caption dropped',
               'invalid_utf8': 'line with invalid UTF-8 (bytes replaced by U+FFFD)'}


def describe_skips(stats: dict) -> str | None:
  """One line for the console and the evaluation table's header, or None when nothing was skipped.

  `stats`: an iterator's `stats()` ('consumed', 'yielded', the RECORD_SKIPS counts, and for folder sources the
  FILE_COUNTS of its captions file).
  """
  parts = []
  skipped = sum(int(stats.get(k, 0)) for k in RECORD_SKIPS)
  if skipped:
    reasons = ', '.join(f'{int(stats[k]):,} {name}' for k, name in RECORD_SKIPS.items() if stats.get(k))
    parts.append(f'skipped {skipped:,} of {int(stats.get("consumed", 0)):,} records read ({reasons})')
  lines = describe_file_counts(stats)
  if lines:
    parts.append(f'captions file: {lines}')
  return '; '.join(parts) or None


def describe_file_counts(counts: dict) -> str:
  """'1 malformed row skipped, 2 null or non-string caption dropped' of a captions file's FILE_COUNTS; '' if none."""
  return ', '.join(f'{int(counts[k]):,} {name}' for k, name in FILE_COUNTS.items() if counts.get(k))
