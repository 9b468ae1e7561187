"""`python -m xmodal.cli ARGS` is `xmodal ARGS`."""

import sys

from xmodal.cli.main import main

sys.exit(main())
