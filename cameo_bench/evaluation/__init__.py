"""Held-out evaluation, one job per module: `metrics` (image quality, viewpoint bins), `attention`
(per-layer attention correspondence), `consistency` (warp error), `evaluate` (the whole evaluation,
perturbation analysis), `figures` (what is drawn at evaluation)."""
