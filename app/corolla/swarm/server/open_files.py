"""The block server's limit on open files.

Every stream a peer opens is a socket in this process and in p2pd, and a server that holds hostile
requests (refusals.py) keeps many of them open on purpose. Common defaults are low (1,024 on Linux
desktops, 256 on macOS) while the hard limit is usually far higher, so the server raises its own soft
limit at start, before p2pd is started (children inherit it). Windows has no such limit for sockets.
"""

from __future__ import annotations

TARGET = 65536
MACOS_OPEN_MAX = 10240  # macOS refuses a soft limit above this when the hard limit is "unlimited"


def open_file_limit() -> int:
    """This process's soft limit on open files (`TARGET` where there is none)."""
    try:
        import resource
    except ImportError:  # Windows
        return TARGET
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return TARGET if soft == resource.RLIM_INFINITY else soft


def raise_open_file_limit(target: int = TARGET) -> int:
    """Raise the soft limit on open files towards `target`, never above the hard limit and never
    lowering it; returns the limit now in effect."""
    try:
        import resource
    except ImportError:
        return TARGET
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return TARGET
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    for value in (wanted, min(wanted, MACOS_OPEN_MAX)):
        if value <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (value, hard))
            break
        except (ValueError, OSError):
            continue
    return open_file_limit()
