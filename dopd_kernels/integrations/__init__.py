"""Trainers of the ecosystem built on the library's losses (each imports its trainer package lazily)."""
