"""`python -m xmodal.train --config ... --workdir ...` is `xmodal train ...`."""

import sys

from xmodal.cli.main import main

sys.exit(main(['train', *sys.argv[1:]]))
