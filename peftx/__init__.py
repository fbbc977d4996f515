from peftx import _native  # noqa: F401
