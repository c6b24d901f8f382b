"""The benchmarks' measuring code, importable from an installed framebroker.

bench/*.py in a clone are thin entry points into these modules; ``framebroker bench``
and ``framebroker tune`` import them directly.
"""
