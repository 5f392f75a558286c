"""What runs beside the daemon, never inside it: the benchmarks (``autosaved bench``), the demo's trainer
(``autosaved demo``). The daemon in a temp dir they start is :class:`~autosaved.testing.private.PrivateDaemon`."""
