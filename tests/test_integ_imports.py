"""Importing autosaved (and its CLI) never imports an integration's framework: they are optional extras."""

from __future__ import annotations

import json

from tests.conftest import run_python

FRAMEWORKS = ("langgraph", "langchain_core", "transformers", "accelerate", "lightning", "pytorch_lightning", "torch")


def test_import_autosaved_imports_no_framework() -> None:
    out = run_python(f"""
        import json, sys
        import autosaved, autosaved.integrations, autosaved.cli.main
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})))
    """).stdout
    assert json.loads(out) == []
