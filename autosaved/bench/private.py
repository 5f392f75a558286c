"""Moved to :mod:`autosaved.testing.private` (imports point down: testing sits below bench). This alias
stays only while branches written before the move are merged; new code imports the new place."""

from ..testing.private import PrivateDaemon as PrivateDaemon
