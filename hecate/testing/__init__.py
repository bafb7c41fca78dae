"""Helpers for testing distributed code (usable by users too)."""
