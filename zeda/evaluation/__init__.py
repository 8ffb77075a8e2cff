"""Evaluation: results and rendering, lm-eval, held-out scoring, telemetry, baselines, FLOPs."""
