"""Trapline: deep active learning for camera-trap images."""
__version__ = "0.1.0"
