"""Numerical utilities (advantage estimators)."""
