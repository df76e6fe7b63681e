"""Pure-function layers over parameter pytrees (plain dicts of arrays)."""
