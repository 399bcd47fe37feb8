"""Helpers of the op fuzz suite (tests/test_fuzz_op.py) and its AddressSanitizer runner."""
