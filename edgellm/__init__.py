"""edgellm: build, sign, ship and serve quantized language models on device fleets.

Importing ``edgellm`` imports neither torch nor any inference runtime.
"""

__version__ = "0.1.0"
