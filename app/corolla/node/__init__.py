"""`corolla node`: the per-user daemon. It hosts the swarm client, supervises the block server, keeps
history in SQLite and serves the local API (and an OpenAI-compatible one) on 127.0.0.1.

- paths.py: where files live (platformdirs; COROLLA_HOME overrides, for tests and portable installs).
- instance.py: one node per user: the lock file with address, pid and token file.
- db.py: SQLite (WAL): chats, messages, hourly contribution stats, settings.
- secrets.py: the OS keyring, or memory for this run when no secure backend exists (and it says so).
- hardware.py: accelerators, memory, per-block needs and a recommended block count.
- settings.py: the typed settings and the swarm choices (public, custom peers, private + invite).
- supervisor.py: the block server child process: states, reasons, restarts with backoff.
- chats.py: chat sessions over the swarm client, streamed and written through to the database.
- api_models.py: the API's request and response types (shared with the window).
- api.py / openai_api.py: the local API and the OpenAI-compatible endpoints (FastAPI).
- service.py: wires it all together; `run_node()` is the entry point.
"""
