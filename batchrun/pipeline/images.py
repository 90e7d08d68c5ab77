"""Images in and out: loading `prompt.images` right before a row is sent, saving generated images.

In: a local path (relative to the input file's folder, and never outside the
folders the job names), a data URL, or an http(s) URL. Local files and data
URLs become bytes typed by their content; URLs stay URLs where the protocol
takes them, and are downloaded (without the API key) where it does not.
`prompt.max_image_side` downscales with Pillow (the `images` extra).

Out: every image of a reply is written atomically under `output.images_dir`,
named from the row id and its position, so a rerun writes the same names. The
folder is batchrun's own, marked so (OWN_FOLDER_MARK): one that already holds
files batchrun did not write is refused before anything is sent (`foreign_files`),
as batchrun never replaces a file it did not write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import mimetypes
import os
import re
import stat
import urllib.parse
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson

from batchrun.base import storage
from batchrun.job.render import ImageInput, Request
from batchrun.job.settings import RequestSettings
from batchrun.job.spec import Job
from batchrun.protocols import CallError, WireProtocol
from batchrun.protocols.reply import ImageOut

IMAGE_TOKEN_ESTIMATE = 1000  # a rough per-image allowance for the tokens-per-minute estimate
PILLOW_MISSING = "image resizing needs Pillow: pip install 'batchrun[images]'"


class ImageError(Exception):
    """An image of one row cannot be sent: the row is an `input` error and nothing is sent."""


def sniff_mime(data: bytes) -> str | None:
    """The image type from the magic bytes, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"):
            return "image/heic"
        if brand in (b"avif", b"avis"):
            return "image/avif"
    if data.startswith(b"BM"):
        return "image/bmp"
    return None


def pillow_available() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def downscale(data: bytes, mime: str, max_side: int) -> tuple[bytes, str]:
    """The image fitted within max_side × max_side, in its own format where Pillow writes it, else PNG."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImageError(PILLOW_MISSING) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max(image.size) <= max_side:
                return data, mime
            fmt = image.format if image.format in ("PNG", "JPEG", "WEBP", "GIF") else "PNG"
            image.thumbnail((max_side, max_side))
            if fmt == "JPEG" and image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            out = io.BytesIO()
            image.save(out, format=fmt)
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"cannot read the image to resize it: {e}") from None
    return out.getvalue(), Image.MIME[fmt]


class ImageLoader:
    """Loads one row's images; `inline_urls` for protocols that take only bytes (Gemini)."""

    def __init__(
        self,
        base_folder: Path,
        allowed_folders: list[Path],
        max_side: int | None,
        inline_urls: bool,
        timeout_s: float,
        max_bytes: int = 20 << 20,
        download_deadline_s: float = 600.0,
    ) -> None:
        self.base_folder = base_folder.resolve()
        self.allowed_folders = [f.resolve() for f in allowed_folders]
        self.max_side = max_side
        self.inline_urls = inline_urls
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes  # prompt.max_image_mb, for a file and a download alike
        self.download_deadline_s = download_deadline_s  # a whole download (timeout_s is between its reads)
        self._client: httpx.AsyncClient | None = None

    async def load(self, refs: tuple[str, ...]) -> tuple[ImageInput, ...]:
        """Raises ImageError naming the image."""
        return tuple([await self._load_one(ref) for ref in refs])

    def downloads(self, refs: tuple[str, ...]) -> list[str]:
        """The refs this loader would download."""
        return [ref for ref in refs if self.inline_urls and _is_http(ref)]

    async def _load_one(self, ref: str) -> ImageInput:
        if ref[:5].lower() == "data:":
            mime, data = _decode_data_url(ref)
        elif _is_http(ref):
            if not self.inline_urls:
                return ImageInput(url=ref)
            mime, data = await self.download(ref)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", ref):
            raise ImageError(f"image {ref}: unsupported URL scheme; use a local path, a data URL or an http(s) URL")
        else:
            mime, data = await anyio.to_thread.run_sync(self._read_file, ref)
        if self.max_side is not None:
            data, mime = await anyio.to_thread.run_sync(downscale, data, mime, self.max_side)
        return ImageInput(mime=mime, data=data)

    def _read_file(self, ref: str) -> tuple[str, bytes]:
        path = (self.base_folder / os.path.expanduser(ref)).resolve()
        if not any(path.is_relative_to(folder) for folder in self.allowed_folders):
            shown = " or ".join(str(f) for f in self.allowed_folders)
            raise ImageError(f"image {ref}: the path leads outside the job's folders ({shown}); refused")
        try:
            data = self._read_bounded(ref, path)
        except FileNotFoundError:
            raise ImageError(f"image {ref}: file not found ({path})") from None
        except OSError as e:
            raise ImageError(f"image {ref}: cannot read it: {e.strerror or e}") from None
        mime = sniff_mime(data) or mimetypes.guess_type(path.name)[0] or ""
        if not mime.startswith("image/"):
            raise ImageError(f"image {ref}: not an image file")
        return mime, data

    def _read_bounded(self, ref: str, path: Path) -> bytes:
        """A regular file no larger than max_bytes, checked before reading (a FIFO or a device would never end)."""
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"image {ref}: not a regular file ({path}); refused")
        if info.st_size > self.max_bytes:
            raise self._too_large(ref)
        with path.open("rb") as f:
            data = f.read(self.max_bytes + 1)  # a file that grew since stat() is still cut off
        if len(data) > self.max_bytes:
            raise self._too_large(ref)
        return data

    def _too_large(self, ref: str) -> ImageError:
        return ImageError(f"image {ref}: larger than {self.max_bytes / 2**20:g} MB (prompt.max_image_mb)")

    async def download(self, url: str) -> tuple[str, bytes]:
        """An image input, or an image answered as a link: bounded like every download (ImageError if not)."""
        with anyio.move_on_after(self.download_deadline_s):
            return await self._fetch(url)
        seconds = f"{self.download_deadline_s:g} s"
        raise ImageError(f"image {url}: the download took longer than {seconds} (run.answer_timeout_s)")

    async def _fetch(self, url: str) -> tuple[str, bytes]:
        if self._client is None:
            # A client of its own: the relay's key must never go to an image host.
            self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=True)
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageError(f"image {url}: download failed: HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise self._too_large(url)
                header_mime = response.headers.get("content-type", "").split(";")[0].strip()
        except httpx.HTTPError as e:
            raise ImageError(f"image {url}: download failed: {e or type(e).__name__}") from None
        mime = sniff_mime(bytes(data[:16])) or header_mime
        if not mime.startswith("image/"):
            raise ImageError(f"image {url}: the download is not an image ({header_mime or 'no content type'})")
        return mime, bytes(data)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _is_http(ref: str) -> bool:
    return ref[:8].lower().startswith(("http://", "https://"))


def _decode_data_url(url: str) -> tuple[str, bytes]:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError(f"image {url[:40]}…: a data URL needs a comma before its data")
    params = header.split(";")
    try:
        if "base64" in (p.strip().lower() for p in params[1:]):
            data = base64.b64decode(payload, validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ImageError(f"image {url[:40]}…: the data URL's base64 is invalid") from None
    mime = params[0].strip().lower() or sniff_mime(data) or ""
    if not mime.startswith("image/"):
        raise ImageError(f"image {url[:40]}…: the data URL is not an image ({mime or 'no type'})")
    return mime, data


# --- images out ----------------------------------------------------------------------

_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_file_name(row_id: str, index: int, mime: str) -> str:
    """`<row id>_<index><ext>`; an id unfit for a file name is cleaned and tagged with its hash."""
    safe = _UNSAFE.sub("_", row_id).strip("._")[:80]
    if safe != row_id:
        safe = f"{safe}-{hashlib.blake2b(row_id.encode(), digest_size=4).hexdigest()}"
    ext = _EXTENSIONS.get(mime) or mimetypes.guess_extension(mime) or ".bin"
    return f"{safe}_{index}{ext}"


OWN_FOLDER_MARK = ".batchrun-images"  # in an images folder batchrun writes to: its files are batchrun's


def foreign_files(folder: Path, own: Collection[Path] = ()) -> bool:
    """Whether `folder` holds files batchrun did not write: in a folder without its mark, anything but `own`
    (the job's other outputs, when images go beside them)."""
    if not folder.is_dir() or os.path.lexists(folder / OWN_FOLDER_MARK):
        return False
    with os.scandir(folder) as entries:
        return any(Path(entry.path).resolve() not in own for entry in entries)


def save_images(images: list[ImageOut], folder: Path, row_id: str) -> list[str]:
    """Write each image atomically; the absolute paths, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    _mark_own(folder)
    paths: list[str] = []
    for index, image in enumerate(images):
        target = folder / image_file_name(row_id, index, image.mime)
        with storage.replacing(target) as f:
            f.write(image.data)
        paths.append(str(target))
    return paths


def _mark_own(folder: Path) -> None:
    if os.path.lexists(folder / OWN_FOLDER_MARK):
        return
    try:
        fd = os.open(folder / OWN_FOLDER_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return  # another row marked it meanwhile
    with os.fdopen(fd, "w") as mark:
        mark.write("batchrun writes this folder's images and replaces them when a row is asked again\n")


def loader_for(job: Job, inline_urls: bool) -> ImageLoader:
    """Paths resolve against the input file's folder; the job file's folder is allowed too."""
    return ImageLoader(
        job.input_folder,
        [job.input_folder, job.folder],
        job.spec.prompt.max_image_side,
        inline_urls,
        job.spec.run.timeout_s,
        int(job.spec.prompt.max_image_mb * 2**20),
        job.spec.run.answer_timeout_s,
    )


def shorten_payloads(value: Any, keep: int = 48) -> Any:
    """A body for display: long strings (base64 images) cut to their start and length."""
    if isinstance(value, dict):
        return {k: shorten_payloads(v, keep) for k, v in value.items()}
    if isinstance(value, list):
        return [shorten_payloads(v, keep) for v in value]
    if isinstance(value, str) and len(value) > 4 * keep:
        return f"{value[:keep]}…({len(value)} characters)"
    return value


def preview_body(protocol: WireProtocol, loader: ImageLoader, request: Request, settings: RequestSettings) -> str:
    """What `validate` shows for one row: local images read, payloads shortened, nothing downloaded."""
    downloads = loader.downloads(request.images)
    try:
        inputs = anyio.run(loader.load, tuple(r for r in request.images if r not in downloads))
        body = shorten_payloads(protocol.build(replace(request, image_inputs=inputs), settings))
    except (ImageError, CallError) as e:
        return f"(not sent: the row would be an input error: {e})"
    text = orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()
    if downloads:
        text += "\n(plus, downloaded and sent inline when the row runs: " + ", ".join(downloads) + ")"
    return text
