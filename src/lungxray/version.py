"""The version of lungxray, in a module of its own so that any module can read it without
importing the package's API (``lungxray/__init__.py``, whose functions import the stages)."""

__version__ = "0.1.0"
