"""The embedded tiny demo model (built deterministically, signed with a demo key)."""
