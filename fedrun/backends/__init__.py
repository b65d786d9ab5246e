"""Backends: map a round's cohort to client updates."""
