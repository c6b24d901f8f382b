"""Placement on Ray: FFT workers and shard writers as Ray actors (``framebroker[ray]``).

Placeholder; filled in below.
"""
from __future__ import annotations


class PlacementError(RuntimeError):
    """Ray is missing or cannot place the actors; the message says what to do."""
