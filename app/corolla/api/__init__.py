"""The node's API contract, shared by the node, the window, the CLI and the tests. Torch-free and
hivemind-free: the window imports it.

- models.py: the request and response types of the local API (strict pydantic models).
- routes.py: the API's paths, named once (the node declares its routes with them, clients build
  their requests with them).
- events.py: the events of a streamed reply, a tagged union (saved message / token / done / failed).
- sse.py: the one server-sent events parser (and the node's encoder of a reply event).
- client.py: the one node client core (requests, errors, pings) and its synchronous face for the
  CLI and scripts; the window's Qt face is gui/node_client.py over the same core.
"""
