"""Shared test settings."""

import os
from pathlib import Path

# The official ImageNet-S lists: ../shared/imagenets/lists beside the checkout (as in CI), or IMAGENETS_LISTS_DIR.
OFFICIAL_LISTS_DIR = Path(
    os.environ.get("IMAGENETS_LISTS_DIR", Path(__file__).resolve().parents[2] / "shared" / "imagenets" / "lists")
)
