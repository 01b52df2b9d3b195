"""The desktop window and tray icon (PySide6). It never imports torch or hivemind: it talks to the
node only through the node's local HTTP API.

- node_client.py: the one non-blocking API client (QNetworkAccessManager), JSON calls and SSE streams.
- launcher.py: find the running node, or start one, without blocking the UI.
- widgets.py: the coverage map and the bar chart (painted with QPainter).
- panes.py: Contribute, Chat, Swarm and Stats panes; window.py: the window, the tray and refreshes.
- app.py: `corolla app` / `corolla-gui`: single instance, no quit on last window closed.
"""
