"""Declarative upcycling experiments: arms of a comparison trained on the same base, token stream and budget.

    python -m experiments.runner experiments/smoke.yaml [--out DIR] [--set budget.tokens=4096] [--dry-run]

or from Python: ``from experiments.runner import run_experiment``.
"""
