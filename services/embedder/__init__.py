"""Trapline embedder service."""
