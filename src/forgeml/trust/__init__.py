"""Trust audits: fairness, privacy, robustness and explanations."""
