"""``autosaved completion``: scripts made by shtab from the CLI's own parser, and bash really completes with
the bash one (commands and a subcommand's options)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def completion(shell: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "autosaved", "completion", shell], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def bash_complete(script: str, words: list[str]) -> list[str]:
    line = " ".join(words)
    cmd = (f'source /dev/stdin; COMP_WORDS=({" ".join(words)}); COMP_CWORD={len(words) - 1}; '
           f'COMP_LINE="{line}"; COMP_POINT={len(line)}; _shtab_autosaved; printf "%s\\n" "${{COMPREPLY[@]}}"')
    proc = subprocess.run(["bash", "-c", cmd], input=script, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completes_commands_and_options() -> None:
    script = completion("bash")
    assert bash_complete(script, ["autosaved", "st"]) == ["status"]
    assert "completion" in bash_complete(script, ["autosaved", "c"])
    assert bash_complete(script, ["autosaved", "delete", "--d"]) == ["--dry-run"]
    assert "--dry-run" in bash_complete(script, ["autosaved", "gc", "--"])


@pytest.mark.parametrize(("shell", "marker"), [("zsh", "#compdef autosaved"), ("fish", "complete -c autosaved"),
                                               ("tcsh", "complete autosaved")])
def test_other_shells_get_a_script(shell: str, marker: str) -> None:
    script = completion(shell)
    assert marker in script and "status" in script, script[:500]


def test_an_unknown_shell_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "autosaved", "completion", "cmd.exe"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
