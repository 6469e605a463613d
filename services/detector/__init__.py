"""Trapline detector service."""
