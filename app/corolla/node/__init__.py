"""`corolla node`: the per-user daemon. It hosts the swarm client, supervises the block server, keeps
history in SQLite and serves the local API (and an OpenAI-compatible one) on 127.0.0.1.

- paths.py: where files live (platformdirs; COROLLA_HOME overrides, for tests and portable installs).
- instance.py: one node per user: the lock file with address, pid and token file.
- db.py: SQLite (WAL): chats, messages, hourly contribution stats, settings.
- secrets.py: the OS keyring, or memory for this run when no secure backend exists (and it says so).
- hardware.py: accelerators, memory, per-block needs and a recommended block count.
- default_model.py: the embedded default model (SmolLM2, converted once from its GGUF) and its card.
- lan_discovery.py: private swarms announced and found on the local network (mDNS).
- settings.py: the typed settings and the swarm choices (public, custom peers, private + invite).
- supervisor.py: the block server child process: states, reasons, restarts with backoff.
- chats.py: chat sessions over the swarm client, streamed and written through to the database.
- api.py / openai_api.py: the local API and the OpenAI-compatible endpoints (FastAPI); their types are
  in corolla/api/.
- service.py: the node's state, settings and background work; `run_node()` is the entry point. Its other
  methods by job: contribution.py (the model and the block server child), swarm_link.py (the swarm
  client: joining by invite, health, spot checks, privacy), status.py (its reports); errors.py: the
  NodeError its services raise and api.py answers.
- invites.py: invites (version 2, bounded reading); sharing.py: the kept key and port, who can join.
- lazy_imports.py: the one lock the engine's first imports (torch, transformers, hivemind) take, so two
  threads never hand each other a half-imported module.
"""
