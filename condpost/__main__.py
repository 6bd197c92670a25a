"""``python -m condpost run experiment.toml [--quick] [--resume]``: the CLI (``condpost.cli``)."""

import sys

from .cli import main

sys.exit(main())
