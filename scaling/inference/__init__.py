"""Inference from a trained run: predict, sample and export.

They build the model and restore params only: no training split, no optimizer.
"""
