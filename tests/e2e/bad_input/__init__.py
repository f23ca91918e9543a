"""The bad-input corpus, one module per CLI (a package, so its conftest does not shadow tests/conftest.py)."""
