"""The bundled demo: a small Llama-shaped parent (demo/parent/) that tessera trains itself on a snapshot of
Python's own documentation and standard library (demo/corpus/, a corpus in the search's format:
search/data.py). `make demo` runs the search on it; `tessera demo-parent` rebuilds it (demo/build.py).
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
PARENT_DIR = DEMO_DIR / "parent"
CORPUS_DIR = DEMO_DIR / "corpus"

# What `tessera demo` generates from: a function, a class docstring, a script's main.
DEMO_PROMPTS = ("def fibonacci(n):\n", 'class Stack:\n    """', "import os\nimport sys\n\n\ndef main(")

# Starts of Python code, what the demo parent was trained to continue: the serving tests' and benchmarks' prompts.
CODE_PROMPTS = (
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Stack:\n    def push(self, item):",
    "for key, value in sorted(",
    "    return self._cache[",
    "# Copyright",
    "with open(path) as f:",
    "raise ValueError(",
)
