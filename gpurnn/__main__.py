"""``python -m gpurnn``: the ``gpurnn`` command."""
import sys

from .cli import main

sys.exit(main())
