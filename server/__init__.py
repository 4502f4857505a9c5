"""slimserve's online half: everything that answers HTTP."""

__version__ = "0.1.0"
