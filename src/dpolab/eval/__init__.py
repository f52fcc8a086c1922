"""Evaluation: the lm-evaluation-harness bridge and its offline task definitions, the contamination check."""
