"""Reading one uploaded file (or a JSON body) from a request, in memory, within a size limit.

The body is streamed and counted as it arrives: a `Content-Length` over the limit is refused
before any of it is read, and a body that grows past the limit (chunked, or a lying header)
is refused at the chunk that crosses it. It is read only once the request has its turn at
the gate (`gate.Gate`), so at most `max_concurrent` bodies are in memory at once. The
multipart form is parsed here, with python-multipart's streaming parser, rather than by
FastAPI's `UploadFile`, which spools files over 1 MB to the system's temporary directory:
nothing of an upload reaches the disk before `screening.Screener` writes it into its own
temporary folder. The file part's Content-Type is kept (`Upload.content_type`): an upload
whose name is no image's is judged by it (`sniff`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header

from fundusfm.errors import DataError

FIELD = "file"  # the form field that carries the image


class UploadRefused(DataError):
    """An upload the API answers with a 4xx/5xx JSON error: `status`, `error` (a short
    name of the problem), the message (`detail`, what to do) and the file, when known."""

    def __init__(self, status: int, error: str, detail: str, file: str | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.file = status, error, detail, file

    def body(self) -> dict:
        named = {"file": self.file} if self.file is not None else {}
        return {"error": self.error, "detail": self.detail, **named}


@dataclass
class Upload:
    name: str  # the file name the client sent (undecodable bytes as surrogate escapes)
    data: bytes
    content_type: str = ""  # the part's Content-Type, lower case without parameters


def too_large(limit: int) -> UploadRefused:
    return UploadRefused(
        413,
        "too_large",
        f"the upload is over the {limit:,}-byte limit (setting max_upload_bytes); "
        "send a smaller file or raise the limit",
    )


def check_length(header: str | None, limit: int) -> None:
    """Refuse a declared body length over the limit before reading any of it."""
    if header is not None and header.isdigit() and int(header) > limit:
        raise too_large(limit)


def _boundary(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRefused(
            400,
            "not_multipart",
            f"expected a multipart/form-data body with the image in the field {FIELD!r} "
            f"(curl -F {FIELD}=@photo.jpg); got content type {content_type or 'none'!r}",
        )
    return params[b"boundary"]


class _Parts:
    """python-multipart callbacks collecting each part's headers and bytes."""

    def __init__(self):
        self.parts: list[dict] = []
        self.field, self.value = bytearray(), bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": lambda: self.parts.append({"headers": {}, "data": bytearray()}),
            "on_part_data": lambda d, s, e: self.parts[-1]["data"].extend(d[s:e]),
            "on_header_field": lambda d, s, e: self.field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.value.extend(d[s:e]),
            "on_header_end": self._header_end,
        }

    def _header_end(self) -> None:
        self.parts[-1]["headers"][bytes(self.field).lower()] = bytes(self.value)
        self.field.clear()
        self.value.clear()


def _file_part(parts: list[dict]) -> Upload:
    for part in parts:
        _, params = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if params.get(b"name") == FIELD.encode():
            name = params.get(b"filename", b"").decode("utf-8", "surrogateescape")
            kind, _ = parse_options_header(part["headers"].get(b"content-type", b""))
            return Upload(name, bytes(part["data"]), kind.decode("latin-1").lower())
    raise UploadRefused(
        400, "no_file", f"the form has no field {FIELD!r}: send the image as {FIELD}=@photo.jpg"
    )


async def read_body(chunks: AsyncIterator[bytes], length: str | None, limit: int) -> bytes:
    """The whole body (a JSON request's), refused with 413 as soon as it passes `limit`."""
    check_length(length, limit)
    body = bytearray()
    async for chunk in chunks:
        body.extend(chunk)
        if len(body) > limit:
            raise too_large(limit)
    return bytes(body)


async def read_upload(
    chunks: AsyncIterator[bytes], content_type: str, length: str | None, limit: int
) -> Upload:
    """The form's `file` part, read from the body `chunks` with at most `limit` bytes."""
    check_length(length, limit)
    parts = _Parts()
    parser = MultipartParser(_boundary(content_type), parts.callbacks())
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except UploadRefused:
        raise
    except Exception as exc:  # python-multipart's parse errors: a malformed form
        raise UploadRefused(400, "bad_form", f"the multipart form cannot be read ({exc})") from exc
    return _file_part(parts.parts)
