import sys
from pathlib import Path

# The stage scripts live at the repository root; tests import them as modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
