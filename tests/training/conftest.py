"""The training tier: the entry point under torchrun, as a user runs it (tests/runs.py); the
session's synthetic corpus fixture lives in tests/conftest.py."""
