"""Evaluation of fine-tuned models the way the paper reports them: accuracy per task through
lm-evaluation-harness, and the measured Load (true experts per token) and FLOPs against a top-k
baseline (``adamoe-eval``). Sits above ``hf`` and ``adapters``; lm-eval is imported on use."""
