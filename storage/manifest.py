"""The schema of a session's manifest.json, checked before any of it is used.

A session folder may come from someone else, so every field is checked for its
type and range (pydantic, strict: no coercion of "12" to 12), and the fields for
their agreement with each other: token ids against the token count, chunk files
against the layout (each layer's chunks exactly once), file names against the
only names a save writes. A name that passes cannot leave the version folder:
no separators but the one after `kv`, no `..`, nothing absolute.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from storage.layout import DTYPE_BYTES, KVLayout

VERSION_NAME = re.compile(r"v-[0-9a-f]{12}")
CHUNK_FILE_NAME = re.compile(r"kv/L[0-9]{3}-[0-9]{7}-[0-9a-f]{8}\.arrow")
TENSOR_FILES = ("device.safetensors", "abstracts.safetensors", "index.safetensors")
# Format 2 hashes a tensor file per block of this many bytes (its last block may be
# shorter), so that blocks are checked side by side and a file read lazily is checked
# when it is read; format 1 hashed each file whole.
HASH_BLOCK = 64 << 20
MAX_TOKENS = 1 << 24  # far beyond any context window; bounds what a manifest can make us allocate
MAX_LAYERS = 1 << 12
MAX_FILE_BYTES = 1 << 44

Count = Annotated[int, Field(ge=0, le=MAX_TOKENS)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LayoutEntry(_Strict):
    num_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    num_kv_heads: Annotated[int, Field(ge=1, le=1024)]
    head_dim: Annotated[int, Field(ge=1, le=4096)]
    dtype: Literal[tuple(DTYPE_BYTES)]  # type: ignore[valid-type]
    chunk_size: Annotated[int, Field(ge=1, le=1 << 16)]
    summary_bits: Literal[2, 4]


class FileEntry(_Strict):
    size: Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]
    sha256: Hex64 | None = None  # format 1: of the whole file
    sha256_blocks: list[Hex64] | None = None  # format 2: of each HASH_BLOCK bytes
    layer: Annotated[int, Field(ge=0, lt=MAX_LAYERS)] | None = None
    # chunk files, format 1: the chunk ids and their crc32s
    chunks: list[Count] | None = None
    crc32: list[Annotated[int, Field(ge=0, lt=1 << 32)]] | None = None
    # chunk files, format 2: a range of chunk ids, and the sha256 of their crc32s
    # (storage.disk.crc32_digest): a 128k-token manifest of the 8B shape is 1 MB, not 28
    first_chunk: Count | None = None
    num_chunks: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    crc32_sha256: Hex64 | None = None


class ModelEntry(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    fingerprint: str
    source: str
    arch: str


class DocumentEntry(_Strict):
    text: str
    system: str | None = None


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class Manifest(BaseModel):
    """The fields a loader reads; others (caller metadata) are kept as they are."""

    model_config = ConfigDict(strict=True, extra="allow")
    format_version: Literal[1, 2]
    kind: Literal["prompt", "document", "chat"]
    num_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)]
    token_ids: list[Annotated[int, Field(ge=0, lt=1 << 31)]]
    layout: LayoutEntry
    files: dict[str, FileEntry]
    model: ModelEntry
    tokenizer_sha256: str
    config: dict
    document: DocumentEntry | None = None
    messages: list[Message] | None = None
    # (a chat: its leading messages that dropping the oldest exchanges keeps)
    pinned_messages: Count | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(self.token_ids) != self.num_tokens:
            raise ValueError(
                f"token_ids holds {len(self.token_ids)} ids, num_tokens says {self.num_tokens}"
            )
        if self.pinned_messages is not None and self.pinned_messages > len(self.messages or []):
            raise ValueError(
                f"pinned_messages is {self.pinned_messages}, more than the "
                f"{len(self.messages or [])} messages"
            )
        if self.kind == "document" and self.document is None:
            raise ValueError("a document session without its document")
        if self.kind == "chat" and self.messages is None:
            raise ValueError("a chat session without its messages")
        tensor_files = ["device.safetensors"] + ["abstracts.safetensors"] * (
            self.format_version > 1
        )
        for name in tensor_files:
            if name not in self.files:
                raise ValueError(f"files: {name} is not listed")
        layout = KVLayout(**self.layout.model_dump())
        want = list(range(layout.num_chunks(self.num_tokens)))
        have: dict[int, list[int]] = {layer: [] for layer in range(layout.num_layers)}
        spans: dict[int, list[tuple[int, int]]] = {layer: [] for layer in range(layout.num_layers)}
        for name, f in self.files.items():
            if name in TENSOR_FILES:
                if self.format_version == 1:
                    if f.sha256 is None or name == "abstracts.safetensors":
                        raise ValueError(f"files.{name}: not a format 1 file or no sha256")
                elif f.sha256_blocks is None or len(f.sha256_blocks) != hash_blocks(f.size):
                    raise ValueError(
                        f"files.{name}: sha256_blocks must hold {hash_blocks(f.size)} hashes "
                        f"for {f.size} bytes"
                    )
                continue
            if not CHUNK_FILE_NAME.fullmatch(name):
                raise ValueError(
                    f"files: {name!r} is not a name a session uses (kv/L<layer>-<chunk>-<id>.arrow)"
                )
            if f.layer is None:
                raise ValueError(f"files.{name}: layer is required")
            if f.layer >= layout.num_layers:
                raise ValueError(
                    f"files.{name}: layer {f.layer}, the layout has {layout.num_layers}"
                )
            if self.format_version == 1:
                if not f.chunks or f.first_chunk is not None or f.crc32_sha256 is not None:
                    raise ValueError(f"files.{name}: chunks are required (format 1)")
                if f.crc32 is not None and len(f.crc32) != len(f.chunks):
                    raise ValueError(
                        f"files.{name}: {len(f.crc32)} crc32s for {len(f.chunks)} chunks"
                    )
                have[f.layer].extend(f.chunks)
            else:
                if (f.first_chunk is None or f.num_chunks is None or f.crc32_sha256 is None
                        or f.chunks is not None or f.crc32 is not None):  # fmt: skip
                    raise ValueError(
                        f"files.{name}: first_chunk, num_chunks and crc32_sha256 are required"
                    )
                spans[f.layer].append((f.first_chunk, f.num_chunks))
        for layer, chunks in have.items():
            if self.format_version == 1:
                count, tiled = len(chunks), sorted(chunks) == want
            else:  # ranges that must tile the chunks: checked without listing them, so a
                # manifest cannot make this allocate more than its own size
                count, tiled = 0, True
                for first, n in sorted(spans[layer]):
                    tiled &= first == count
                    count += n
                tiled &= count == len(want)
            if not tiled:
                raise ValueError(
                    f"files: the chunk files of layer {layer} hold {count} chunks, "
                    f"{len(want)} expected once each for {self.num_tokens} tokens"
                )
        return self


def hash_blocks(size: int) -> int:
    """How many HASH_BLOCK blocks a file of `size` bytes is hashed in (one at least)."""
    return max(1, -(-size // HASH_BLOCK))


def validate_manifest(data: object) -> Manifest:
    """The checked manifest, or ValueError naming the first fields at fault."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors()[:3]:
            where = ".".join(str(p) for p in err["loc"]) or "manifest"
            problems.append(f"{where}: {err['msg']}")
        more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
        raise ValueError("; ".join(problems) + more) from None
