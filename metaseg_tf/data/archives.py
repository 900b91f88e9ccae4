"""Zip archives unpacked safely (a DICOM series often comes as one): numbered names instead of the archive's
paths, and limits on entries, bytes and inflation checked before anything is written."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from metaseg_tf.data.discover import DataError

ZIP_RATIO_LIMIT = 200  # an entry over 1 MiB that inflates more than this is treated as a zip bomb
KEPT_SUFFIXES = (".dcm", ".dicom", ".ima")  # kept on the numbered names (DICOM is recognised by content too)


class ArchiveTooLarge(DataError):
    """A zip over a limit: too many entries, too many bytes, or an entry that inflates like a zip bomb."""


def extract_zip(archive: Path | str, destination: Path, max_files: int, max_bytes: int) -> Path:
    """Unpack a zip of DICOM files safely into ``destination`` (made here): entries are written under numbered
    names (never the archive's paths); refused before anything is written: an entry named with an absolute
    path or ``..``, a link, more than ``max_files`` entries, more than ``max_bytes`` declared in all, or an entry
    that inflates more than :data:`ZIP_RATIO_LIMIT` times (a zip bomb); the sizes are enforced while writing
    too, since a header can lie. The entry count is read from the end-of-central-directory record before the
    directory itself is parsed. A damaged, encrypted or otherwise unreadable zip is a :class:`DataError`.
    Returns ``destination``."""
    declared_entries = _declared_entries(Path(archive))
    if declared_entries is not None and declared_entries > max_files:
        raise ArchiveTooLarge(f"the zip holds {declared_entries}{' or more' if declared_entries == 0xFFFF else ''} "
                              f"entries; the limit is {max_files}")
    try:
        handle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise DataError(f"not a readable zip archive: {error}") from error
    with handle:
        entries = [info for info in handle.infolist() if not info.is_dir()]
        for info in entries:
            name = info.filename.replace("\\", "/")
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
                raise DataError(f"the zip holds an entry with an unsafe name ({name[:80]!r}): refused")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError(f"the zip holds a symbolic link ({name[:80]!r}): refused")
        if len(entries) > max_files:
            raise ArchiveTooLarge(f"the zip holds {len(entries)} entries; the limit is {max_files}")
        declared = sum(info.file_size for info in entries)
        if declared > max_bytes:
            raise ArchiveTooLarge(f"the zip unpacks to {declared} bytes; the limit is {max_bytes}")
        for info in entries:
            if info.file_size > ZIP_RATIO_LIMIT * max(info.compress_size, 1) and info.file_size > 1 << 20:
                raise ArchiveTooLarge(f"an entry of the zip inflates {info.file_size // max(info.compress_size, 1)} times "
                                "(a zip bomb?): refused")
        destination.mkdir(parents=True)
        written = 0
        try:
            for number, info in enumerate(entries):
                suffix = ".dcm" if info.filename.lower().endswith(KEPT_SUFFIXES) else ""
                with handle.open(info) as source, (destination / f"{number:05d}{suffix}").open("wb") as out:
                    while chunk := source.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArchiveTooLarge(f"the zip unpacks to more than the limit of {max_bytes} bytes")
                        out.write(chunk)
        except DataError:
            raise
        except Exception as error:  # CRC errors, encrypted entries, unsupported methods: zipfile raises many types
            raise DataError(f"the zip is damaged or uses what cannot be unpacked here ({type(error).__name__}: "
                            f"{str(error)[:120]})") from error
    return destination


def _declared_entries(archive: Path) -> int | None:
    """The total entry count of a zip's end-of-central-directory record (None: not found; ZIP64 says 65535,
    "at least that many")."""
    try:
        with archive.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - (1 << 16) - 22))
            tail = handle.read()
    except OSError:
        return None
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 12 > len(tail):
        return None
    count = int.from_bytes(tail[at + 10 : at + 12], "little")
    return count
