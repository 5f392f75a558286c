"""Optional integrations with other frameworks. ``import autosaved`` imports none of them; each one imports
its framework only when it is itself imported (``autosaved.integrations.dcp`` needs torch)."""
