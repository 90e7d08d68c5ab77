"""Small real images for the emulator: PNGs drawn from a seed, and one-line descriptions of images sent in.

Pure Python (zlib + struct), so the emulator needs no imaging library and its
answers are the same everywhere.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib

_PALETTE = {
    "red": (200, 40, 40),
    "orange": (235, 140, 30),
    "yellow": (235, 215, 50),
    "green": (50, 160, 70),
    "blue": (40, 90, 200),
    "purple": (130, 60, 170),
    "pink": (235, 130, 180),
    "brown": (120, 80, 40),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
}
_COLOURS = list(_PALETTE.values())


def png(width: int, height: int, seed: int, background: tuple[int, int, int] | None = None) -> bytes:
    """A width × height RGB PNG: a background (picked by the seed unless given) and a disc of another colour."""
    n = len(_COLOURS)
    background = background or _COLOURS[seed % n]
    disc = _COLOURS[(_COLOURS.index(background) + 1 + (seed // n) % (n - 1)) % n]  # never the background colour
    cx, cy, r2 = width / 2, height / 2, (min(width, height) * 0.3) ** 2
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type 0: the row as is
        for x in range(width):
            rows += bytes(disc if (x - cx) ** 2 + (y - cy) ** 2 <= r2 else background)
    return encode_png(width, height, bytes(rows))


def encode_png(width: int, height: int, filtered_rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(filtered_rows, 9))
        + chunk(b"IEND", b"")
    )


def png_size(ratio: str | None, long_side: int = 64) -> tuple[int, int]:
    """Width and height for an aspectRatio such as "3:4" (square when absent or unknown)."""
    try:
        w, h = (int(n) for n in (ratio or "1:1").split(":"))
    except ValueError:
        w, h = 1, 1
    if w <= 0 or h <= 0:
        w, h = 1, 1
    scale = long_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def describe(data: bytes) -> str:
    """`a 64x48 PNG, mostly red`, or less for formats the emulator does not decode."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        width, height = struct.unpack(">II", data[16:24])
        colour = main_colour(data)
        return f"a {width}x{height} PNG" + (f", mostly {colour}" if colour else "")
    kind = {b"\xff\xd8": "a JPEG", b"GI": "a GIF", b"RI": "a WEBP", b"BM": "a BMP"}.get(data[:2], "an image")
    return f"{kind} of {len(data)} bytes"


def decode_base64(text: str) -> bytes:
    """Base64 in either alphabet, padded or not: JSON APIs send the standard one, the google-genai SDK
    (pydantic's bytes) the URL-safe one. Raises binascii.Error on anything else."""
    standard = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)


def describe_data_url(url: str) -> str:
    _, _, payload = url.partition(",")
    try:
        return describe(decode_base64(payload))
    except binascii.Error:
        return "an unreadable image"


def palette_rgb(name: str) -> tuple[int, int, int]:
    return _PALETTE[name]


def main_colour(data: bytes) -> str | None:
    """The palette colour nearest the mean pixel, for 8-bit RGB/RGBA non-interlaced PNGs."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    pos, idat, header = 8, bytearray(), b""
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if len(header) < 13:
        return None
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {2: 3, 6: 4}.get(colour_type)
    if depth != 8 or channels is None or interlace:
        return None
    try:
        raw = zlib.decompress(bytes(idat))
    except zlib.error:
        return None
    totals = [0, 0, 0]
    previous = bytearray(width * channels)
    stride = width * channels
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        if len(line) != stride + 1:
            return None
        row = _unfilter(line[0], bytearray(line[1:]), previous, channels)
        for c in range(3):
            totals[c] += sum(row[c::channels])
        previous = row
    mean = [t / (width * height) for t in totals]
    return min(_PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(_PALETTE[name], mean)))


def _unfilter(kind: int, row: bytearray, prev: bytearray, bpp: int) -> bytearray:
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        up = prev[i]
        up_left = prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 2:
            row[i] = (row[i] + up) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            p = left + up - up_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
            predictor = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
            row[i] = (row[i] + predictor) & 0xFF
    return row
