"""The desktop window and tray icon (PySide6). It never imports torch or hivemind: it talks to the
node only through the node's local HTTP API, whose types it shares with the node (corolla/api/).

- app.py: `corolla app`: single instance (QLocalServer), no quit on last window closed, finds or starts the node.
- launcher.py: find the running node (node/instance.py's lock file and ping), or start one.
- node_client.py: the window's face of the node client (QNetworkAccessManager): JSON calls, each answer read
  once as its corolla.api model (one sentence, never a crash, when a node of another version answers in
  another form), and SSE streams; node_settings.py: the node's Settings as the window reads and sends them.
- window.py: the main window: the panes, the banner, refresh timers, quitting; window_refresh.py: its reads
  of the node (status, swarm, stats); status_text.py: the one-line texts about the node (tray status,
  memory, the quit question).
- panes/: Contribute, Chat, Swarm and Stats, one module each.
- transcript.py: the chat transcript (Markdown, code blocks); highlight.py: code colours (Pygments);
  turns.py: a chat message as the transcript shows it (the node's Message and the window's error line).
- swarm_graph.py: the swarm map; charts.py: the contribution charts (pyqtgraph).
- settings_dialog.py: settings, also the first run's; settings_sharing.py: its sections about other
  computers (who may join, swarms on this network); settings_checks.py: its checks and the node's
  messages as sentences; prefs.py: what the window remembers (QSettings).
- tray.py: the tray icon and its menu; autostart.py: start at login per OS.
- theme.py: light or dark palettes; widgets.py: small shared widgets (plain-text labels and the like).
"""
