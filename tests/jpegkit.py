"""Progressive JPEGs with as many scans as asked for, written by hand: libjpeg decodes every scan over the
whole coefficient array, so a few bytes a scan cost the decoder a pass over every block."""

from __future__ import annotations

import struct

BLOCK = 8
EOB_RUN_BITS = 14  # the longest end-of-band run: symbol 0xE0, 2**14 + 14 bits, up to 32767 blocks


class _Bits:
    """Entropy-coded bits, MSB first, with 0xFF stuffed as JPEG wants."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.value = 0
        self.count = 0

    def put(self, value: int, length: int) -> None:
        self.value = (self.value << length) | value
        self.count += length
        while self.count >= 8:
            self.count -= 8
            byte = (self.value >> self.count) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0)
        self.value &= (1 << self.count) - 1

    def flush(self) -> bytes:
        if self.count:
            self.put((1 << (8 - self.count)) - 1, 8 - self.count)  # padded with ones
        return bytes(self.out)


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def many_scan_jpeg(width: int, height: int, scans: int) -> bytes:
    """A grey progressive JPEG of `width` x `height` whose DC scan is followed by `scans - 1` AC scans of end-of-band
    runs only (about 45 bytes each at 7000 x 7000). Every pixel is mid-grey; libjpeg notes the repeated bands as a
    bogus progression and decodes on."""
    blocks = -(-width // BLOCK) * -(-height // BLOCK)
    parts = [b"\xff\xd8", _segment(0xDB, b"\x00" + bytes([1] * 64))]
    parts.append(_segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"))
    # One code each, of length 1: DC difference category 0 (table 0), and EOB14 (AC table 0).
    parts.append(_segment(0xC4, b"\x00" + bytes([1] + [0] * 15) + b"\x00"))
    parts.append(_segment(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\xe0"))
    dc = _Bits()
    for _ in range(blocks // 64):
        dc.put(0, 64)
    dc.put(0, blocks % 64)
    parts += [_segment(0xDA, b"\x01\x01\x00\x00\x00\x00"), dc.flush()]
    ac = _Bits()
    for _ in range(-(-blocks // 32767)):
        ac.put(0, 1)
        ac.put((1 << EOB_RUN_BITS) - 1, EOB_RUN_BITS)  # a run of 32767 blocks; the last one may overrun the scan
    ac_scan = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + ac.flush()
    parts += [ac_scan] * (scans - 1)
    parts.append(b"\xff\xd9")
    return b"".join(parts)
