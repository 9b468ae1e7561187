"""README's Quickstart and CI agree: .ci/run runs the test command verbatim."""

import re

from helpers import ROOT


def quickstart_commands():
  readme = (ROOT / 'README.md').read_text()
  block = re.search(r'## Quickstart.*?```bash\n(.*?)```', readme, re.S).group(1)
  return [line for line in block.splitlines() if line and not line.startswith('#')]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
  commands = quickstart_commands()
  assert len(commands) == 2
  assert 'xmodal train --config configs/shapes.py' in commands[0]
  assert 'pytest' in commands[1]
  assert commands[1] in (ROOT / '.ci' / 'run').read_text().splitlines()
