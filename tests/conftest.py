import sys
from pathlib import Path

# tests import their shared fixture builders (fixtures_llava) as plain modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
