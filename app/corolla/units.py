"""Formatting shared by the command line and the window (no heavy imports here)."""


def human_bytes(n: float | None) -> str:
    """1536 -> "1.5 KiB"; None -> "?"."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
