"""Draw Corolla's icon (five petals round a core) and write it as PNG, ICO and ICNS under
resources/icons/. Run once when the design changes; the files are committed (a few KB each).

    QT_QPA_PLATFORM=offscreen python packaging/make_icons.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QBrush, QColor, QGuiApplication, QImage, QPainter, QPen

OUT = Path(__file__).resolve().parent.parent / "resources" / "icons"
PETAL = QColor("#e0707a")
PETAL_EDGE = QColor("#b04a56")
CORE = QColor("#f4c542")


def draw(size: int) -> QImage:
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    centre = QPointF(size / 2, size / 2)
    petal_r, orbit = size * 0.22, size * 0.25
    painter.setPen(QPen(PETAL_EDGE, max(1.0, size / 64)))
    painter.setBrush(QBrush(PETAL))
    for i in range(5):
        angle = -math.pi / 2 + i * 2 * math.pi / 5
        painter.drawEllipse(centre + QPointF(math.cos(angle), math.sin(angle)) * orbit, petal_r, petal_r)
    painter.setBrush(QBrush(CORE))
    painter.drawEllipse(centre, size * 0.14, size * 0.14)
    painter.end()
    return image


def main() -> int:
    QGuiApplication(sys.argv)
    OUT.mkdir(parents=True, exist_ok=True)
    big = draw(512)
    for name, image in (("corolla.png", big), ("corolla.icns", big), ("corolla.ico", draw(256))):
        if not image.save(str(OUT / name)):
            print(f"could not write {name}", file=sys.stderr)
            return 1
    print(f"icons written to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
