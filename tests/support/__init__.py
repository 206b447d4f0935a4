"""Shared test helpers: tiny models and toy updates (tiny_models), the rounding-aware table
comparison (tables), the fake study body (study_fake) and a user's own run (user_run)."""
