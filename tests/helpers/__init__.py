"""Helpers shared by test modules (no tests here): ``from helpers.<module> import ...``.

``tests/`` is on ``sys.path`` through ``pythonpath`` in pyproject's ``[tool.pytest.ini_options]``; test modules
import only from here and never from each other. Fixtures live in ``tests/conftest.py``.
"""
