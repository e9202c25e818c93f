"""tessera: cheaper LLM serving by changing the architecture (Puzzle, FFN Fusion) and running it fast."""

__version__ = "0.1.0"
