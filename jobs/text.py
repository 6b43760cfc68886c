"""Text files that users write (prompts files, metadata.jsonl, CONFIG_FILE): UTF-8, as editors save it.

A UTF-8 byte-order mark (Windows Notepad writes one) is dropped and CRLF line ends are lines like
any other; a file that is not UTF-8 (GBK is common for Chinese text) is refused with a message that
says what to do, never read as garbage.
"""

from __future__ import annotations

from pathlib import Path

from jobs.errors import BadInput

BOM = b"\xef\xbb\xbf"


def decode(data: bytes, what: str) -> str:
    """`data` as text, its byte-order mark dropped; BadInput naming `what` if it is not UTF-8."""
    try:
        return data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise BadInput(
            f"{what}: not UTF-8 text (line {line}); save it as UTF-8 (GBK and other encodings are not read)"
        ) from None


def read(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    return decode(data, f"{what} {path}")


def yaml_error(what: str, error: Exception) -> BadInput:
    """The one line for a file that is not YAML: where, and what the parser says."""
    mark = getattr(error, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark else ""
    problem = getattr(error, "problem", None) or ("nested too deeply" if isinstance(error, RecursionError) else error)
    return BadInput(f"{what}{where}: not valid YAML ({problem})")
