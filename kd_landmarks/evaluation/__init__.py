"""Evaluation: metrics over a split, the report, statistics over seeds, the paper's published numbers."""
