"""Shared fixtures: the real service started as a user starts it, and real servers it uses."""
