"""The window's panes, one module each: contribute, chat, swarm, stats."""

from corolla.gui.panes.chat import ChatPane
from corolla.gui.panes.contribute import ContributePane
from corolla.gui.panes.stats import StatsPane
from corolla.gui.panes.swarm import SwarmPane

__all__ = ["ChatPane", "ContributePane", "StatsPane", "SwarmPane"]
