"""Reading the documents a user ingests: text and markdown files, one clear error each."""

from __future__ import annotations

from pathlib import Path

from offload.errors import OffloadError


def read_documents(paths) -> str:
    """Text and markdown files, joined with their names as headings when there are several."""
    paths = list(paths)
    if not paths:
        raise OffloadError("no documents given")
    parts = []
    for name in paths:
        p = Path(name)
        try:
            if not p.is_file():
                raise OffloadError(
                    f"document not found: {p}" if not p.exists() else f"not a file: {p}"
                )
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise OffloadError(
                f"{p}: not UTF-8 text (offload reads text and markdown files)"
            ) from None
        except OSError as e:  # (a name too long, no permission, a read error)
            raise OffloadError(f"cannot read {p}: {e.strerror or e}") from None
        if not text.strip():
            raise OffloadError(f"{p}: the document is empty")
        parts.append(f"# {p.name}\n\n{text.strip()}" if len(paths) > 1 else text.strip())
    return "\n\n".join(parts)
