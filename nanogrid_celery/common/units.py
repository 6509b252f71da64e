"""Byte units, defined once."""

KB = 1024
MB = 1024 * 1024
