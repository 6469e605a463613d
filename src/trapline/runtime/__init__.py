"""Shared service runtime."""
