"""The node's API contract, shared by the node, the window, the CLI and the tests. Torch-free and
hivemind-free: the window imports it.

- models.py: the request and response types of the local API (strict pydantic models).
- events.py: the events of a streamed reply, a tagged union (saved message / token / done / failed).
- sse.py: the one server-sent events parser (and the node's encoder of a reply event).
- client.py: the one node client core (requests, errors, pings) and its synchronous face for the
  CLI and scripts; the window's Qt face is gui/node_client.py over the same core.
"""
