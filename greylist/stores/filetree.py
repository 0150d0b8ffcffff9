"""``file:///DIR``: the cqgreylist file tree, read as it is and written safely.

Layout (unchanged for IPv4, so an admin can switch binaries and no known client
is greylisted again)::

    DIR/66/66.94.237.12                          IPv4: first octet / address
    DIR/v6/2001-0db8/2001-0db8-0000-...-0001     IPv6: /32 prefix / 8 groups

``v6`` can never be an IPv4 first octet, and the IPv6 names use only hex digits
and dashes (no colons, which some tools and file systems mishandle).

A file's mtime is the last activity and its content is ``FIRST_SEEN PASSES``.
An empty file is a cqgreylist entry, or one of ours still pending: first seen
= mtime, no passes. cqgreylist never touched a file after creating it, so its
daily cron ``find -mtime +1`` re-greylisted every regular sender; here a pass
refreshes mtime, so the same cron line (or ``greylist expire``) only removes
clients that went quiet.

Race safety: a new entry is created with O_EXCL (one of several simultaneous
connections wins, the others read its entry), and a changed entry is written
to a temporary file and renamed over the old one, so a reader sees the old or
the new record, never a torn one. Nothing is fsynced: losing an entry in a
crash costs one more tempfail, not mail.
"""

from __future__ import annotations

import os

from stat import S_ISREG as _S_ISREG

from greylist.core.keys import BadAddress, packed_ip, parse_ip
from greylist.core.policy import Record
from greylist.stores.base import COUNT, DISK_USAGE, PATHS, SCAN, TEMP_FILES, Store, StoreError

# Every file is created new (O_EXCL) and never through a link (O_NOFOLLOW): a planted
# symlink in the store cannot make us write anywhere else. Reads never follow a link and
# never block on a FIFO.
_O_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class FileStore(Store):
    capabilities = frozenset({SCAN, COUNT, DISK_USAGE, PATHS, TEMP_FILES})

    def __init__(self, base: str) -> None:
        super().__init__()
        if not base.startswith("/"):
            raise StoreError(f"file store needs an absolute directory, not {base!r}")
        self.base = base.rstrip("/") or "/"
        self.url = "file://" + self.base

    @classmethod
    def open(cls, where, lean: bool = True) -> "FileStore":
        return cls(where.location)

    @classmethod
    def missing(cls, where) -> str | None:
        return None if os.path.isdir(where.location or "/nonexistent") else "no such directory"

    @classmethod
    def in_use(cls, where) -> str | None:
        if where.location and os.path.isdir(where.location) and os.listdir(where.location):
            return "the directory is not empty"
        return None

    @classmethod
    def scratch_url(cls, where, run: int, make_dir) -> str:
        if not where.location:
            return f"file://{make_dir()}"
        return f"{where.url.rstrip('/')}/run{run}" if run else where.url

    # -- paths -------------------------------------------------------------
    def path_of(self, key: str) -> tuple[str, str]:
        """(directory, file) for a key; the key is re-parsed, never used raw.

        An address is ``DIR/66/66.94.237.12`` (cqgreylist's place); a network
        ``DIR/66/66.94.237.0_24``; a triplet or auto-whitelist key, which holds
        arbitrary envelope addresses, a hash of it: ``DIR/t/ab/ab12...``, with
        the key itself kept in the file.
        """
        if "|" in key:
            from _blake2 import blake2b

            digest = blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
            directory = f"{self.base}/t/{digest[:2]}"
            return directory, f"{directory}/{digest}"
        address, slash, bits = key.partition("/")
        try:
            packed = packed_ip(address)
            suffix = ""
            if slash:
                if not bits.isdigit() or not 0 < int(bits) <= len(packed) * 8:
                    raise BadAddress(key)
                suffix = f"_{int(bits)}"
        except BadAddress:
            raise StoreError(f"file store keys are addresses, networks or triplets, not {key!r}") from None
        if len(packed) == 4:
            directory = f"{self.base}/{packed[0]}"
            return directory, f"{directory}/{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}{suffix}"
        digits = packed.hex()
        groups = [digits[i : i + 4] for i in range(0, 32, 4)]
        directory = f"{self.base}/v6/{groups[0]}-{groups[1]}"
        return directory, f"{directory}/{'-'.join(groups)}{suffix}"

    # -- reading -----------------------------------------------------------
    def get(self, key: str) -> Record | None:
        _, path = self.path_of(key)
        return self._read(path)

    def _content(self, key: str, record: Record) -> bytes:
        if "|" in key:  # hashed file name: the key goes into the file
            return b"%.3f %d %s\n" % (record.first_seen, record.passes,
                                       key.encode("utf-8", "surrogateescape"))
        return format_content(record)

    def _read(self, path: str) -> Record | None:
        raw = self._read_raw(path, 128)
        return None if raw is None else parse_content(raw[1], raw[0])

    def _read_raw(self, path: str, limit: int) -> tuple[float, bytes] | None:
        """(mtime, up to ``limit`` bytes of content) of an entry, or None if it is gone."""
        self.count("stat")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        if not _S_ISREG(st.st_mode):
            # a symlink, FIFO, directory or device is not an entry of ours: treated as
            # absent (so it is replaced, by a rename that never follows it) and reported
            self.warnings.append(f"{path} is not a regular file; replaced")
            return None
        if st.st_size == 0:
            return st.st_mtime, b""
        self.count("read")
        try:
            fd = os.open(path, _O_READ)
            try:
                data = os.read(fd, limit)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None  # expired between stat and open
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        return st.st_mtime, data

    # -- writing -----------------------------------------------------------
    def add(self, key: str, record: Record, ttl: float | None = None) -> bool:
        directory, path = self.path_of(key)
        return self._write_file(directory, path, _O_CREATE_NEW, self._content(key, record),
                                record.last_seen)

    def put(self, key: str, record: Record, ttl: float | None = None) -> None:
        directory, path = self.path_of(key)
        # an unpredictable name, created new: nothing planted in advance can be written through
        tmp = f"{directory}/{_temp_file(path[len(directory) + 1:])}"
        if not self._write_file(directory, tmp, _O_CREATE_NEW, self._content(key, record), record.last_seen):
            raise StoreError(f"cannot create {tmp}: it exists already")
        self.count("rename")
        try:
            os.rename(tmp, path)
        except OSError as exc:
            self._unlink_quietly(tmp)
            raise StoreError(f"cannot rename {tmp} to {path}: {exc.strerror}") from None

    def _write_file(self, directory: str, path: str, flags: int, content: bytes, mtime: float) -> bool:
        """Create and fill a file, making its directory on demand; False if O_EXCL found it there."""
        for attempt in (1, 2):
            self.count("create")
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                return False
            except FileNotFoundError:
                if attempt == 2:
                    raise StoreError(f"cannot create {path}: directory vanished") from None
                self._mkdir(directory)
                continue
            except OSError as exc:
                raise StoreError(f"cannot create {path}: {exc.strerror}") from None
            try:
                self._fill(fd, content, mtime, path)
            finally:
                os.close(fd)
            return True
        return False  # pragma: no cover - the loop always returns

    def _fill(self, fd: int, content: bytes, mtime: float, path: str) -> None:
        """Write the content and set mtime (the injected clock's time, not the kernel's)."""
        try:
            if content:
                self.count("write")
                if os.write(fd, content) != len(content):
                    raise OSError(28, "short write (disk full?)")
            self.count("utime")
            os.utime(fd, (mtime, mtime))
        except OSError as exc:
            self._unlink_quietly(path)
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None

    def _mkdir(self, directory: str) -> None:
        """mkdir -p, mode 0700 as cqgreylist made its directories; making the store's own
        directory is reported (a typo in GREYLIST_STORE, or a run as the wrong user)."""
        self.count("mkdir")
        if not os.path.isdir(self.base):
            self.warnings.append(f"created the missing store directory {self.base} "
                                 f"(mode 700, owner uid {os.geteuid()})")
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create directory {directory}: {exc.strerror}") from None

    def _unlink_quietly(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def delete(self, key: str, expected: Record | None = None) -> bool:
        _, path = self.path_of(key)
        return self._delete(path, expected)

    def _delete(self, path: str, expected: Record | None) -> bool:
        if expected is not None and self._read(path) != expected:
            return False  # a wrapper touched it since it was scanned
        self.count("unlink")
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {exc.strerror}") from None
        return True

    # -- iterating ---------------------------------------------------------
    def _entry_dirs(self) -> list[tuple[str, object]]:
        """(directory, how its file names become keys) for every directory of entries;
        ``None`` for the hashed triplet directories, whose keys are inside the files."""
        try:
            top = sorted(os.listdir(self.base))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {self.base}: {exc.strerror}") from None
        dirs: list[tuple[str, object]] = []
        for name in top:
            if name in ("t", "v6"):
                try:
                    subdirs = sorted(os.listdir(f"{self.base}/{name}"))
                except OSError:
                    continue
                key_of = _v6_key if name == "v6" else None
                dirs += [(f"{self.base}/{name}/{sub}", key_of) for sub in subdirs]
            elif name.isdigit():
                dirs.append((f"{self.base}/{name}", _v4_key))
        return dirs

    def scan(self):
        """Every readable entry; names that are not ours (or temp files) are skipped."""
        for directory, key_of in self._entry_dirs():
            yield from self._scan_dir(directory, key_of)

    def _scan_dir(self, directory: str, key_of):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return
        for name in names:
            if key_of is None:  # hashed: FIRST PASSES KEY, one read for record and key
                if name.startswith("."):
                    continue
                try:
                    raw = self._read_raw(f"{directory}/{name}", 4096)
                except StoreError:
                    self.count("unreadable")
                    continue
                parts = raw[1].split(b" ", 2) if raw is not None else []
                if len(parts) == 3:
                    key = parts[2].rstrip(b"\n").decode("utf-8", "surrogateescape")
                    yield key, parse_content(raw[1], raw[0])
                continue
            key = key_of(name)
            if key is None:
                continue
            try:
                record = self._read(f"{directory}/{name}")
            except StoreError:
                continue
            if record is not None:
                yield key, record

    def size(self) -> int:
        """Entries counted from directory listings alone (no stat per file)."""
        total = 0
        for directory, _key_of in self._entry_dirs():
            try:
                total += sum(1 for name in os.listdir(directory) if not name.startswith("."))
            except OSError:
                continue
        return total

    def stale_temp_files(self, older_than: float):
        """Temp files left by a wrapper killed mid-write (paths), for expire to remove: only
        in the store's own directories of entries, and only named as put() names them. A
        walk of the whole tree took any ``.*.tmp`` at any depth, so a store URL one
        directory too high (``file:///var`` for ``file:///var/greylist``, in a cron line)
        made ``greylist expire`` remove other programs' files."""
        for directory, _key_of in self._entry_dirs():
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if not _temp_name(name):
                    continue
                path = f"{directory}/{name}"
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if _S_ISREG(st.st_mode) and st.st_mtime < older_than:
                    yield path

    def disk_usage(self) -> dict[str, int]:
        """Files, directories and bytes on disk (allocated blocks), for reports."""
        files = directories = size = 0
        for root, dirs, names in os.walk(self.base):
            directories += 1
            try:
                size += os.stat(root).st_blocks * 512
            except OSError:
                pass
            for name in names:
                files += 1
                try:
                    size += os.stat(f"{root}/{name}").st_blocks * 512
                except OSError:
                    pass
        return {"files": files, "directories": directories, "bytes": size}


def _temp_file(entry: str) -> str:
    """put()'s temporary file for ``entry``: ``.ENTRY.PID.RANDOM.tmp``, 12 random hex digits."""
    return f".{entry}.{os.getpid()}.{os.urandom(6).hex()}.tmp"


def _temp_name(name: str) -> bool:
    """A name :func:`_temp_file` makes (or ``.ENTRY.PID.tmp``, as it made them before they had
    12 random hex digits): what expire may remove as a killed writer's."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    parts = name[1:-4].split(".")
    if len(parts) >= 3 and len(parts[-1]) == 12 and _HEX.issuperset(parts[-1]):
        parts.pop()
    return len(parts) >= 2 and parts[0] != "" and _DIGITS.issuperset(parts[-1]) and parts[-1] != ""


_HEX = frozenset("0123456789abcdef")
_DIGITS = frozenset("0123456789")


def format_content(record: Record) -> bytes:
    """Empty while pending with mtime = first seen (cqgreylist's own format)."""
    if record.passes == 0 and record.first_seen == record.last_seen:
        return b""
    return b"%.3f %d\n" % (record.first_seen, record.passes)


def parse_content(data: bytes, mtime: float) -> Record:
    """Read ``FIRST_SEEN PASSES``; anything else is treated as a cqgreylist entry."""
    parts = data.split(b" ", 2)
    if len(parts) == 3:  # a hashed entry: FIRST PASSES KEY
        parts = parts[:2]
    if len(parts) == 2:
        try:
            first, passes = float(parts[0]), int(parts[1])
        except ValueError:
            pass
        else:
            if first == first and passes >= 0:
                return Record(first, mtime, passes)
    return Record(mtime, mtime, 0)


def _v4_key(name: str) -> str | None:
    name, _, bits = name.partition("_")
    try:
        packed = packed_ip(name)
    except BadAddress:
        return None
    if len(packed) != 4 or ":" in name or (bits and not (bits.isdigit() and 0 < int(bits) <= 32)):
        return None
    return f"{name}/{int(bits)}" if bits else name


def _v6_key(name: str) -> str | None:
    name, _, bits = name.partition("_")
    if bits and not (bits.isdigit() and 0 < int(bits) <= 128):
        return None
    key = _v6_address(name)
    return None if key is None else (f"{key}/{int(bits)}" if bits else key)


def _v6_address(name: str) -> str | None:
    groups = name.split("-")
    if len(groups) != 8 or any(len(g) != 4 for g in groups):
        return None
    try:
        return parse_ip(":".join(groups))
    except BadAddress:
        return None
