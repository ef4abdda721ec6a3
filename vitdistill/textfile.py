"""Text read from files a user supplies (config files, captions, class lists), decoded one way.

    decode_text(data, "captions.csv")   # str, or a one-line error naming the file and the bad byte
"""

from __future__ import annotations

from vitdistill.errors import DataError, VitdistillError


def decode_text(data: bytes, where: str, error: type[VitdistillError] = DataError,
                expected: str = "a text file") -> str:
    """UTF-8 text (a BOM allowed); undecodable bytes or NULs (binary data) raise ``error`` naming ``where``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); expected {expected}") from None
    if "\x00" in text:
        raise error(f"{where}: contains NUL bytes (binary data?); expected {expected}")
    return text
