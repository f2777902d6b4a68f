"""Procedurally drawn stand-ins for real datasets (NOT real data), for the demo and the tests."""
