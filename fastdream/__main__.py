"""``python -m fastdream``: the command line."""

import sys

from fastdream.cli import main

sys.exit(main())
