"""Trapline trainer service."""
