"""The window's panes: contribute, chat, swarm, stats (one module each; the Chat pane's widgets,
conversations and replies are in chat_layout.py, chat_list.py and chat_reply.py; what the Contribute
pane says in words is in contribute_text.py; the Swarm pane's table of servers in swarm_table.py)."""

from corolla.gui.panes.chat import ChatPane
from corolla.gui.panes.contribute import ContributePane
from corolla.gui.panes.stats import StatsPane
from corolla.gui.panes.swarm import SwarmPane

__all__ = ["ChatPane", "ContributePane", "StatsPane", "SwarmPane"]
