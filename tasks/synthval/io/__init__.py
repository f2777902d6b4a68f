"""Bytes in and out: every read and write by URI, HTTP downloads, GCS, Unity Simulation, archives.

The lowest layer: it knows nothing of datasets or models, so every other package can use it.
"""
