"""Test instrumentation that must be importable inside the daemon process: the file-system operation
recorder the power-loss checker reads (:mod:`.fstrace`) and the checker itself (:mod:`.crashsim`); and
:class:`.private.PrivateDaemon`, the daemon in a temp dir the tests, the scripts, the bench and the demo run.

It lives in the package, not under ``tests/``, because the recorder runs inside the real daemon (a
subprocess started from an installed package) and the scripts under ``scripts/`` drive the checker.
Nothing here is imported unless a test or script asks for it, or a daemon's environment names the recorder
as the storage seam's plug-in (``AUTOSAVED_FILEOPS``, see :mod:`autosaved.storage.fileops`); the storage
layer itself never imports this package.
"""
