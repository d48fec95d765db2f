"""Where user state lives. Its own module (no torch) so that `poi client` can find the admin token
without loading the model registry."""

from __future__ import annotations

import os
from pathlib import Path


def poi_home() -> Path:
    """Where user state lives (keys, keyring, user models): $POI_HOME or ~/.maxwell-poi."""
    return Path(os.environ.get("POI_HOME", Path.home() / ".maxwell-poi"))
