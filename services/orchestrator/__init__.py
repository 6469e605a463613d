"""Trapline orchestrator service."""
