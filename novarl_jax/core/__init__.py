"""Layouts, sharding rules and numerical utilities shared by every other package."""
