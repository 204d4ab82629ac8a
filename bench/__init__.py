"""The Usage Analytics API benchmark: `uv run python -m bench` (see bench/README.md).

Never part of the test suite: it generates a large dataset, starts real servers and
measures them against floors taken in the same run.
"""
