"""Evaluation: what a converted model keeps and what it saves.

- `zeda.evaluation.run_eval`: `evaluate` (``zeda.evaluate``), the orchestration.
- `zeda.evaluation.result`: `EvalResult` / `CurvePoint` and saving.
- `zeda.evaluation.report`: what an `EvalResult` reports: its tables and the console summary table.
- `zeda.evaluation.render`: Markdown/HTML/text tables and figures.
- `zeda.evaluation.lm_eval`: lm-eval tasks through an `HFLM` subclass.
- `zeda.evaluation.heldout`: held-out perplexity, agreement and KL, chunked over tokens.
- `zeda.evaluation.curve`: the accuracy-versus-FLOPs curve at matched measured share.
- `zeda.evaluation.baselines`: training-free slot-dropping rules and their calibration.
- `zeda.evaluation.verdict`: zeda against every rule at its measured share (`compare`).
- `zeda.evaluation.flops` / `counts`: analytic parameters and FLOPs from a config.

Nothing is imported here, so ``zeda.evaluation.flops`` stays cheap (lm-eval loads only on use).
"""
