"""What runs beside the daemon, never inside it: the benchmarks (``autosaved bench``), the demo's trainer
(``autosaved demo``) and :class:`~autosaved.bench.private.PrivateDaemon`, a daemon in a temp dir that the
demo, the benchmarks and the tests start as a subprocess."""
