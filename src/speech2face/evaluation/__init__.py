"""Retrieval R@K with intervals, decoded-face measures and the evaluation report."""
