"""``python -m nanogrid_celery.cli`` is the ``nanogrid`` command."""

import sys

from nanogrid_celery.cli import main

sys.exit(main())
