"""Chats generated where torch already is: the block server's process, while the node contributes.

The node owns chats, the database and the API; when its block server runs, it asks that process to
generate a reply over a local channel and streams the pieces back, so the node itself never imports
torch or transformers while contributing (README, Footprint).

- channel.py: the channel's framing (JSON lines, bounded, every read and write under a timeout) and its
  handshake (a per-run secret the node gives the server in its environment). No torch.
- client_host.py: one swarm client for a target (model, peers), created on first use. Used by the node
  (when it chats itself) and by the engine.
- engine.py: the generating side in the server's process: chat sessions kept per chat, one reply per
  connection, stop and errors as events.
- swarm_report.py: the Swarm pane's report (servers, verdicts, route), read through the same client.
- listener.py: the Unix socket the engine answers on (its file 0600 in the server's folder).
"""
