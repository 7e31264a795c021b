"""``python -m vladva_openclip.eval``: same as ``vladva-eval``."""
import sys

from .cli import main

sys.exit(main())
