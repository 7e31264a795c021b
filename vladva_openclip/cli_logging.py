"""How the command-line tools print this package's log messages (one place, shared by every CLI)."""
from __future__ import annotations

import logging


def setup_cli_logging(quiet: bool) -> None:
    """This package's messages on stderr. Not through the root logger: open_clip_train installs its own root
    handlers while it trains (its per-step lines), and a second root handler would print every line twice."""
    logger = logging.getLogger("vladva_openclip")
    if not any(getattr(h, "_vladva_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._vladva_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
