"""Reproducible model-building scripts (torchvision ``references/`` style), one folder per model."""
