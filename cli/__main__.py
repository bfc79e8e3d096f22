"""``python -m attnc.cli``: the ``attnc`` command."""

import sys

from . import main

sys.exit(main())
