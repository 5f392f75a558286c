"""``autosaved demo``: see autosaved save a trainer that gets killed, in one command.

Starts a private daemon in a temp dir, runs the demo trainer, SIGKILLs it mid-run, restarts the daemon
(SIGTERM: it saves everything first), runs the trainer again, and checks the resumed run ends
bit-identical to an uninterrupted one. Exit 0 when it does.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from typing import Any

from ..bench.trainer import reference
from ..testing.private import PrivateDaemon


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="kill a demo trainer mid-run and watch it resume")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--kill-at", type=int, default=120, help="SIGKILL the trainer once it reports this step")


def _trainer(address: str, steps: int, hold_at: int | None = None) -> subprocess.Popen[str]:
    hold = ["--hold-at", str(hold_at)] if hold_at is not None else []
    return subprocess.Popen(
        [sys.executable, "-m", "autosaved.bench.trainer", "--address", address, "--steps", str(steps), *hold],
        stdout=subprocess.PIPE, text=True,
    )


def run(args: argparse.Namespace) -> int:
    say = print
    with PrivateDaemon(config='[policy]\nidle = "0.2s"\nmin_gap = "0.5s"\n') as daemon:
        say(f"1. private daemon started (state dir {daemon.state_dir})")
        trainer = _trainer(daemon.address, args.steps, hold_at=args.kill_at)
        assert trainer.stdout is not None
        last = 0
        for line in trainer.stdout:
            if line.startswith("step "):
                last = int(line.split()[1])
                if last >= args.kill_at:
                    trainer.send_signal(signal.SIGKILL)
                    break
        trainer.wait()
        say(f"2. trainer SIGKILLed after step {last} was acknowledged")
        code = daemon.stop(signal.SIGTERM)
        say(f"3. daemon stopped with SIGTERM (exit {code}) after saving every acknowledged step")
        daemon.start()
        say("4. a new daemon started on the same state dir")
        trainer = _trainer(daemon.address, args.steps)
        out, _ = trainer.communicate(timeout=300)
        resumed = next((ln for ln in out.splitlines() if ln.startswith(("resumed", "started"))), "?")
        done = next((ln for ln in out.splitlines() if ln.startswith("done")), "")
        say(f"5. trainer restarted: {resumed}; {done}")
        expected = reference(args.steps)
        got = done.split()[-1] if done else "?"
        exact = resumed == f"resumed at step {last}" and got == expected
        say(f"6. uninterrupted run digest {expected}; resumed run digest {got}: "
            f"{'identical - the resume was exact' if exact else 'DIFFERENT'}")
        if not exact:
            say(daemon.log(), file=sys.stderr)
        return 0 if exact else 1
