"""Where the tests find the repository and the golden files."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def golden_dir() -> Path:
    """The golden files made by the public CoMER code: $FASTCOMER_GOLDEN_DIR, else ../shared/golden."""
    return Path(os.environ.get("FASTCOMER_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
