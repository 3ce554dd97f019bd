"""Image files, read the same way by every layer: the training loader (uadc.data.mvtec), the
torch-free runtime (uadc.runtime) and ``uadc verify --images``.

``eight_bit`` brings 16-bit and 32-bit-integer grayscale to 8 bits by value (Pillow's
``convert("RGB")`` would saturate them to white) and refuses float pixels; ``find_images`` walks
folders for image files and leaves out what is not a part to judge (MVTec masks, earlier
``uadc predict`` outputs). numpy and Pillow only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from uadc.core.constants import MASKS_FOLDER, OVERLAYS_DIR, PREDICTIONS_JSONL
from uadc.core.errors import UadcError, one_line, warn_once
from uadc.core.io import file_key
from uadc.core.scoped import warnings_ignored

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff")   # .jfif: a web JPEG saved on Windows
# the decoders uadc lets Pillow use, whatever a file is named: a PostScript file named x.png was handed to
# Ghostscript (whose -dSAFER has been bypassed), a GIF or WebP so named read without a word
READ_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")   # a camera's MPO JPEG opens as JPEG
# images of formats uadc does not read in a folder walk: named in a warning / left_out, not dropped silently
OTHER_IMAGE_EXTS = frozenset((".webp", ".gif", ".avif", ".heic", ".heif", ".jp2", ".pgm", ".ppm", ".pnm", ".ico",
                              ".tga", ".jxl"))


@contextlib.contextmanager
def open_image(path: Any, what: str = "image") -> Iterator[Image.Image]:
    """``Image.open`` whose every failure on the file's content (not an image, truncated, a
    decompression bomb over Pillow's pixel limit, a decoder's own exception on crafted bytes) is
    one ``unreadable <what> PATH: ...`` UadcError; UadcErrors raised inside pass unchanged. A path
    that is no regular file (a named pipe would block the open forever) is refused first."""
    if isinstance(path, (str, os.PathLike)) and os.path.exists(path) and not os.path.isfile(path):
        raise UadcError(f"unreadable {what} {shown(path)}: " + ("a folder, not an image file" if os.path.isdir(path)
                                                           else "not a regular file"))
    try:
        with warnings_ignored(Image.DecompressionBombWarning):   # 1-2x Pillow's pixel limit: read and resized
            im = Image.open(path, formats=READ_FORMATS)
        with im:
            if getattr(im, "is_animated", False) and im.format != "MPO":   # a camera's JPEG with its preview: one photo
                _note_once("frames", path, "several frames (an animation or a multi-page file); uadc reads the first")
            yield upright(im)
    except UadcError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on hostile files
        where = f" {shown(path)}" if isinstance(path, (str, os.PathLike)) else ""      # a stream has no name to show
        if isinstance(exc, OSError) and exc.strerror:   # the system's reason (a file removed meanwhile), not a class
            raise UadcError(f"unreadable {what}{where}: {exc.strerror}") from None
        if isinstance(exc, UnidentifiedImageError):   # another format's bytes (whatever the name), or none
            raise UadcError(f"unreadable {what}{where}: {_unidentified(path)}") from None
        why = re.sub(r" ?<[\w.]+ object at 0x[0-9a-f]+>", "", str(exc))   # no memory address in the line
        if where:   # Pillow names the file by repr: a latin-1 name's byte read `\udce9`, not `\xe9` as shown
            why = why.replace(repr(str(path)), f"'{shown(path)}'")
        raise UadcError(f"unreadable {what}{where}: {type(exc).__name__}: {why[:200]}") from None


# how the formats uadc reads begin: such a file Pillow cannot open is damaged, not of another format
_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _unidentified(source: Any) -> str:
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(8)
        else:   # from its start, as Pillow reads it: where Pillow's probe stopped, 8 bytes read as empty
            at = source.tell()
            head, _ = (source.seek(0), source.read(8))[1], source.seek(at)
    except (OSError, AttributeError, ValueError):
        head = b"?"
    if not head:
        return "an empty file"
    if head.startswith(_SIGNATURES):
        return "damaged or cut short (Pillow cannot identify it)"
    return "not a PNG, JPEG, BMP or TIFF image (uadc reads those only)"


def upright(im: Image.Image) -> Image.Image:
    """The image as displayed: a camera's JPEG stores its pixels rotated with an EXIF Orientation
    tag, and masks (and operators) see the displayed image."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return im
    return ImageOps.exif_transpose(im)


def _note_once(what: str, source: Any, text: str) -> None:
    """``source: text`` as a warning, once per folder (bytes and PIL images: once); a newline in a
    file name cannot start a line of its own."""
    named = isinstance(source, (str, os.PathLike))
    warn_once(log, ("image", what, os.path.dirname(str(source)) if named else ""), "%s: %s (noted once per folder)",
              shown(source) if named else "an image given as bytes or a PIL image", text)


def eight_bit(im: Image.Image, source: Any) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale as 8-bit ``L``; float pixels refused (UadcError); a
    palette image with transparency as ``RGBA``."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)   # uint16 or int32: a float64 copy made a 16-bit image cost 25 bytes a pixel
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UadcError(f"unsupported image {shown(source)}: mode {im.mode} values outside 0..65535")
        if a.size and a.max() < 4096:   # 12-bit camera data in a 16-bit file reads nearly black
            _note_once("dim", source, f"{im.mode} pixels only up to {int(a.max())} of 65535; uadc maps 0..65535 to "
                                      "0..255, so it reads nearly black: scale 12-bit data to 16 bits")
        b = a.astype(np.uint32)   # round(a / 257) in integers: (2a + 257) // 514 (a / 257 never ends in .5)
        b *= 2
        b += 257
        b //= 514
        return Image.fromarray(b.astype(np.uint8), "L")
    if im.mode == "F":
        raise UadcError(f"unsupported image {shown(source)}: 32-bit float pixels (mode F); save it as 8- or 16-bit")
    if im.mode in ("P", "PA") and "transparency" in im.info:
        return im.convert("RGBA")   # the same colours; converting the palette directly makes Pillow warn on stderr
    if im.mode == "La":   # premultiplied: Pillow converts it only to LA (to L or RGB: its raw ValueError)
        return im.convert("LA")
    return im


@dataclass
class FoundImages:
    files: list[Path]
    skipped: dict[str, int] = field(default_factory=dict)   # why -> how many image files a folder walk left out


def _skip_reason(f: Path, root: Path, blocked: dict[Path, str]) -> str | None:
    """Why a folder walk below ``root`` leaves ``f`` out: it lies in a ``blocked`` folder, it or a
    folder on its way is hidden, it is among MVTec masks (``ground_truth/``), or it is no file."""
    for d, why in blocked.items():
        if d == f.parent or d in f.parents:
            return why
    parts = f.relative_to(root).parts
    if any(is_hidden(x) for x in parts):
        return "hidden (a name starting with '.', or a macOS zip's __MACOSX)"
    if MASKS_FOLDER in (part.lower() for part in parts[:-1]):   # Ground_Truth too, as data reads it
        return f"masks under {MASKS_FOLDER}/"
    return not_a_file(f)   # named like an image, but a dangling link, a pipe, a folder: counted, not read


def not_a_file(f: Path) -> str | None:
    """Why ``f``, named like an image, is no file to read (a dangling link or a link loop, a pipe, a
    folder, removed meanwhile); None for a regular file."""
    if f.is_file():
        return None
    if f.is_symlink() and not f.exists():
        return "broken link"
    return "not a regular file" if f.exists() else "gone while the folder was read"


def is_hidden(name: str) -> bool:
    """Dot names: macOS's ``._x.png`` resource forks copied with a dataset (not images), editor
    and notebook folders, uadc's own temps; a macOS zip's ``__MACOSX`` folder of those forks (taken for
    a category nested one level deeper). Left out of folder walks."""
    return name.startswith(".") or name == "__MACOSX"


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (a latin-1 zip unpacked here; Python
    keeps them as lone surrogates, which no UTF-8 file can hold) shown as ``\\xNN``; other text
    unchanged."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # a surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(path: Any) -> str:
    """A path as an error or warning line names it: a newline in a file name is written ``\\x0a``
    (the message is one line; a table's row names the file in its own escaping), not-UTF-8 bytes ``\\xNN``."""
    return one_line(printable(str(path)))


def check_utf8_name(folder: Path, what: str) -> None:
    """A folder whose name becomes a key of uadc's outputs (a category, a defect type) must be
    UTF-8 text; one that is not is refused in one line rather than failing a write later."""
    if printable(folder.name) != folder.name:
        raise UadcError(f"{what} folder name is not UTF-8 text: {printable(str(folder))} (it becomes a key of "
                        f"uadc's outputs; rename it, e.g. `convmv -f latin1 -t utf-8 -r --notest FOLDER`)")


def find_images(paths: "list[Path] | Path | str", exclude: list[Path] | tuple = ()) -> FoundImages:
    """Files given directly, and image files found recursively in folders (sorted), except, in a
    folder walk, the overlays of ``exclude`` (the run's own output folder) and of earlier ``uadc
    predict`` output folders, and files under MVTec ``ground_truth/`` (masks, not parts); a file
    reached twice is kept once. ``skipped`` counts what was left out, by reason. One path may be
    given alone."""
    if isinstance(paths, (str, os.PathLike)):   # not walked a character at a time
        paths = [paths]
    paths = list(paths) if hasattr(paths, "__iter__") and not isinstance(paths, (bytes, dict)) else [paths]
    for bad in (p for p in paths if not isinstance(p, (str, os.PathLike))):   # None: "not iterable" from the walk
        raise UadcError(f"images: expected a path or a list of paths, got {type(bad).__name__} {bad!r:.60}")
    found, seen, others = FoundImages([]), set(), set()
    for p in map(Path, paths):
        if p.is_dir():
            root = p.absolute()
            files = _walk(root)
            # only the overlays: a camera folder that once received --out still holds parts to judge
            blocked = {Path(x).absolute() / OVERLAYS_DIR: "in the output folder" for x in exclude}
            blocked.update({j.parent / OVERLAYS_DIR: "in a uadc predict output folder"
                            for j in files if j.name == PREDICTIONS_JSONL})
            blocked = {d: why for d, why in blocked.items() if root in d.parents}
            start = len(found.files)   # of a file and a link to it, the file is kept
            for f in sorted((f for f in files if f.suffix.lower() in IMAGE_EXTS), key=lambda f: (f.is_symlink(), f)):
                _add(found, seen, p / f.relative_to(root), _skip_reason(f, root, blocked))
            found.files[start:] = sorted(found.files[start:])
            for f in sorted(f for f in files if f.suffix.lower() in OTHER_IMAGE_EXTS):
                if _skip_reason(f, root, blocked) is None and (key := f.resolve()) not in others:
                    others.add(key)   # once, however many of the inputs reach it
                    why = f"not read ({f.suffix.lower()}; uadc reads {' '.join(IMAGE_EXTS)})"
                    found.skipped[why] = found.skipped.get(why, 0) + 1
        elif p.exists():
            _add(found, seen, p, None)
        else:
            raise UadcError(f"input is a broken link or a link loop: {shown(p)}" if p.is_symlink() else
                            f"input not found: {shown(p)}{_installed_example(p)}")
    return found


def _installed_example(p: Path) -> str:
    """A hint for the README's ``examples/...`` paths run outside a checkout: where the wheel put them."""
    if p.is_absolute() or p.parts[:1] != ("examples",):
        return ""
    from importlib import resources
    try:
        installed = Path(str(resources.files("uadc.examples"))).joinpath(*p.parts[1:])
    except ModuleNotFoundError:
        return ""
    return f" (the demo images installed with uadc are at {installed})" if installed.exists() else ""


def _walk(root: Path) -> list[Path]:
    """Every file below ``root``, through symlinked folders too (a dataset organised with links),
    each real folder once (a link back up is not a loop). The real tree is walked first, so a folder
    also reached through a link is listed by its real path, whatever order the file system lists names in."""
    plain: set[str] = set()
    files, linked = [], False
    for folder, subfolders, names in os.walk(root):
        plain.add(folder)
        files += [Path(folder) / n for n in names]
        linked = linked or any(os.path.islink(os.path.join(folder, d)) for d in subfolders)
    if not linked:   # no symlinked folder: the tree is walked once
        return files
    seen = {os.path.realpath(f) for f in plain}
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders.sort()   # two links to one folder: the first name listed, on every file system
        if folder in plain:
            continue
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        files += [Path(folder) / n for n in names]
    return files


def _add(found: FoundImages, seen: set[tuple], f: Path, why: str | None) -> None:
    key = None
    if why is None:
        try:
            f.resolve(strict=True)
            key = file_key(f)   # a hard link (cp -al) is the file too: it ran twice
        except (OSError, RuntimeError):   # a symlink loop (RuntimeError before Python 3.13), a link gone
            why = "broken link"
    why = why or ("given twice" if key in seen else None)
    if why is None:
        seen.add(key)
        found.files.append(f)
    else:
        found.skipped[why] = found.skipped.get(why, 0) + 1
