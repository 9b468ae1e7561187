"""`python -m xmodal.train --config ... --workdir ...` is `xmodal train ...`."""

import sys

from xmodal.cli import huge_pages
from xmodal.cli.main import main

huge_pages.reexec_with_huge_pages()  # as `xmodal` does as the process entry (main re-executes only without argv)
sys.exit(main(['train', *sys.argv[1:]]))
