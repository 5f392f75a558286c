"""Live configuration: re-read the TOML file when it changes (watchfiles) or on SIGHUP.

A valid file replaces the daemon's config and every job's effective policy is recomputed as the new
``[policy]`` defaults plus that job's own client overrides, so running jobs follow the change at once. An
invalid file is logged with the key at fault and the old config keeps running. Keys bound to the socket,
the state dir or a listener (:data:`~autosaved.config.RESTART_KEYS`) only change at the next restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import anyio.to_thread
import watchfiles

from ..config import RESTART_KEYS, Config, parse_config_table, read_toml
from ..errors import ConfigError

log = logging.getLogger("autosaved.reload")


def reread(current: Config) -> tuple[Config, list[str]]:
    """The config the file now describes, on top of the values the daemon cannot change live.

    Returns the new config and the restart-only keys whose new value was not applied. Raises
    :class:`ConfigError` (naming the key) for an invalid file.
    """
    if current.config_file is None:
        raise ConfigError("the daemon was started without a config file; there is nothing to reload")
    raw = read_toml(current.config_file)
    fresh = parse_config_table(raw, Config(address=current.address, state_dir=current.state_dir,
                                           config_file=current.config_file))
    fresh = replace(fresh, state_dir=fresh.state_dir.expanduser().absolute())
    pinned = {key: getattr(current, key) for key in RESTART_KEYS}
    ignored = [key for key in RESTART_KEYS if key in raw and getattr(fresh, key) != pinned[key]]
    return replace(fresh, **pinned), ignored


@dataclass(frozen=True)
class ReloadContext:
    """What the reloader needs: the live config, and the daemon's one writer of it."""

    config: Callable[[], Config]
    apply_config: Callable[[Config], None]


class Reloader:
    def __init__(self, ctx: ReloadContext) -> None:
        self.ctx = ctx
        self._lock = anyio.Lock()
        self.reloads = 0
        self.failures = 0

    async def reload(self, trigger: str) -> bool:
        """Apply the file as it is now; ``False`` (old config kept) when it is invalid."""
        async with self._lock:
            current = self.ctx.config()
            try:
                new, ignored = await anyio.to_thread.run_sync(reread, current)
            except ConfigError as exc:
                self.failures += 1
                log.error("config reload rejected trigger=%s file=%s error=%s; keeping the running config",
                          trigger, current.config_file, exc.message)
                return False
            except Exception as exc:  # anything else a file can make a parser do: the same, never the watcher's end
                self.failures += 1
                log.error("config reload rejected trigger=%s file=%s error=%s; keeping the running config",
                          trigger, current.config_file, exc, exc_info=exc)
                return False
            for key in ignored:
                log.warning("config reload: %s changed in %s; it takes effect at the next restart",
                            key, current.config_file)
            if new == current:
                log.info("config reload trigger=%s file=%s: nothing changed", trigger, current.config_file)
                return True
            self.ctx.apply_config(new)
            self.reloads += 1
            # The config in force, not the file's: a derived dirty_bytes ("auto") shows its value.
            applied = self.ctx.config()
            log.info("config reloaded trigger=%s file=%s policy=%s quota=%s", trigger, current.config_file,
                     applied.policy.to_wire(), applied.quota)
            return True

    async def watch(self) -> None:
        """Reload whenever the file is written, replaced (editors rename over it) or created."""
        path = self.ctx.config().config_file
        if path is None:
            return
        target = Path(path).absolute()

        def ours(_change: watchfiles.Change, changed: str) -> bool:
            return Path(changed).name == target.name

        # The directory, not the file: an editor that renames a new file over the old one would leave an
        # inotify watch on the file itself pointing at a deleted inode.
        backoff = 1.0
        while True:
            try:
                async for _changes in watchfiles.awatch(target.parent, watch_filter=ours, debounce=200, step=50,
                                                         recursive=False):
                    backoff = 1.0
                    try:
                        await self.reload("file-change")
                    except Exception:  # one failed reload is logged; the watcher keeps watching (issue 19)
                        self.failures += 1
                        log.exception("config reload trigger=file-change failed; keeping the running config")
                return
            except Exception as exc:  # the watch itself broke (the directory went away...): watch again later
                log.error("watching %s failed (%s); watching again in %.0fs (SIGHUP reloads meanwhile)",
                          target, exc, backoff)
            await anyio.sleep(backoff)
            backoff = min(60.0, backoff * 2)
