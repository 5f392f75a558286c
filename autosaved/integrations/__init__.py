"""Drop-ins for the frameworks people already run. Each is its own module with its own extra, imported
only when asked for, so ``import autosaved`` never imports LangGraph, transformers, Lightning or torch:

- :mod:`autosaved.integrations.langgraph` — ``AutosavedSaver``, a LangGraph checkpointer
  (``pip install 'autosaved[langgraph]'``);
- :mod:`autosaved.integrations.transformers` — ``AutosavedCallback`` and ``resume_from`` for the Hugging
  Face ``Trainer`` (``pip install 'autosaved[transformers]'``);
- :mod:`autosaved.integrations.lightning` — ``AutosavedCheckpointIO`` and ``AutosavedCallback`` for
  Lightning (``pip install 'autosaved[lightning]'``);
- :mod:`autosaved.integrations.dcp` — ``AutosavedStorageWriter``/``AutosavedStorageReader`` for PyTorch
  Distributed Checkpoint across ranks and hosts (``pip install 'autosaved[torch]'``).
"""
