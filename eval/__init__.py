"""Evaluation for Diffusion-RPO checkpoints: generation (`eval.generate`), human-preference metrics and win rates
(`eval.score`), and the paper's style-alignment study (`eval.style_dataset`, `eval.style_alignment`)."""
