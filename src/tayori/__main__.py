"""``python -m tayori``: the same as the ``tayori`` command."""

import sys

from tayori.cli import main

sys.exit(main())
