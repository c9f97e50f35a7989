"""Evaluation: metrics and analyses of trained models."""
