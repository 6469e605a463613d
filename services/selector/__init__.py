"""Trapline selector service."""
