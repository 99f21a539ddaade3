"""What a source hands to ingest, the one way raw images become stored pixels (`stored_pixels`), and what
ingest computes from stored pixels (`pixels_sha256`, `perceptual_hash`)."""

from __future__ import annotations

import hashlib
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


@dataclass(frozen=True)
class Credentials:
    """An image's Content Credentials (its C2PA manifest), as read: `state` is the C2PA validation state
    (`Trusted`: a signer on the trust list; `Valid`: intact and well signed, signer not on a trust list; `Invalid`:
    the asset or the manifest was changed after signing, or the signature does not verify) or `unreadable` (a
    manifest is there but cannot be parsed). `entries` are the training-and-data-mining assertion's entries
    (entry -> its `use`), empty when the manifest has none."""

    state: str
    entries: dict[str, str] = field(default_factory=dict)
    claim_generator: str | None = None
    signer: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class Planted:
    """What a synthetic source planted on purpose (written to planted.json), so tests can check it is caught: a
    governance defect, or a near-duplicate with the way it was altered (`kind`); `original` names the record a
    copy was made from."""

    defect: str
    kind: str | None = None
    original: str | None = None


@dataclass
class SourceRecord:
    record_id: str
    source_uri: str
    metadata: dict[str, object] = field(default_factory=dict)  # raw fields, keyed by the card's column names
    pixels: np.ndarray | None = None  # uint8 [height, width, channels] at the configured size
    source_sha256: str | None = None  # of the source file's bytes, or of the generator's raw output
    problem: tuple[str, str] | None = None  # (reason code, detail) when there is no usable image
    planted: Planted | None = None  # what a synthetic source planted on purpose
    credentials: Credentials | None = None  # the image's C2PA manifest, where it carries one

    def __post_init__(self) -> None:
        # one spelling per id: `café` typed composed or decomposed (as macOS names files) is one record, and a
        # withdrawal in either form matches it (policy.load_withdrawals normalises the same way)
        self.record_id = unicodedata.normalize("NFC", self.record_id)


# What a source yields: a record, or a picklable callable that makes it (a functools.partial of a module-level
# function), so ingest can leave the costly part (reading and decoding a file) to its workers while the source
# itself stays a cheap, ordered listing.
Item = SourceRecord | Callable[[], SourceRecord]


def resolved(item: Item) -> SourceRecord:
    return item if isinstance(item, SourceRecord) else item()


class ImageProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def pixels_sha256(pixels: np.ndarray) -> str:
    """Digest of the exact stored pixels, shape included, so equal digests mean equal images."""
    header = "x".join(str(d) for d in pixels.shape).encode()
    return hashlib.sha256(header + b":" + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def perceptual_hash(pixels: np.ndarray) -> str:
    """The 64-bit DCT hash (imagehash.phash) of stored pixels as 16 hex digits: a re-encoded, resized,
    brightness-shifted or slightly cropped copy differs from its original in few bits (pipeline.near_duplicates)."""
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    return str(imagehash.phash(image))


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grey images scaled to 8 bits (Pillow's own convert clips instead of scaling)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(img, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageProblem("unsupported_image_mode", f"{img.mode} values outside 0..65535")
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")
    if img.mode == "F":
        raise ImageProblem("unsupported_image_mode", "floating-point pixels have no defined 8-bit scale")
    return img


def _flatten_alpha(img: Image.Image, background: int) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa") or (img.mode == "RGBA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img


def stored_pixels(img: Image.Image, size: int, channels: int, background: int = 255) -> np.ndarray:
    """Any Pillow image as uint8 [size, size, channels]: orientation applied, alpha flattened, centre crop."""
    img = ImageOps.exif_transpose(img)
    img = _flatten_alpha(_to_8bit(img), background)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def decode(data: bytes, size: int, channels: int, background: int, max_pixels: int) -> np.ndarray:
    """Decode file bytes into stored pixels; every way it can fail is an ImageProblem with a reason."""
    if not data:
        raise ImageProblem("empty_file", "zero-byte file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with Image.open(BytesIO(data)) as img:
                if img.format == "JPEG":
                    img.draft("L" if channels == 1 else "RGB", (size, size))
                img.load()
                return stored_pixels(img, size, channels, background)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # our own detail: Pillow's error states twice the limit (where its warning becomes an error)
            raise ImageProblem("decompression_bomb", f"more pixels than ingest.max_image_pixels {max_pixels}") from None
        except UnidentifiedImageError:
            raise ImageProblem("not_an_image", "not an image format Pillow can identify") from None
        except ImageProblem:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageProblem("unreadable_image", f"corrupt or truncated: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
