"""The version of lungxray, in a module of its own so that any module can read it without
importing the package's API (``lungxray/__init__.py``, which imports the stages)."""

__version__ = "0.1.0"
