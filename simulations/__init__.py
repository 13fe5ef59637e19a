"""Runnable experiments on Flower's simulation engine; the same apps deploy to SuperLink/SuperNodes."""
