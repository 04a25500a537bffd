"""Held-out evaluation: image metrics, attention-correspondence metrics, the evaluation itself, figures."""
