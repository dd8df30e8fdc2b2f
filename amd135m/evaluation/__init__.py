"""Evaluation: perplexity on a dataset split, HumanEval pass@k, zero-shot multiple choice.

Kept free of imports: the HumanEval execution workers import `amd135m.evaluation.execution`
alone, without JAX.
"""
