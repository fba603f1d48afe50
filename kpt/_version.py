"""The kpt version, in a module of its own: any module reads it without importing ``kpt``."""

__version__ = "0.1.0"
