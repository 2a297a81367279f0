#!/usr/bin/env python3
"""Write a deterministic "newc" (SVR4, no CRC) cpio archive, as the Linux initramfs unpacker reads.

Usage: mkcpio.py [--mtime N] SPEC OUTPUT      (SPEC or OUTPUT may be "-" for stdin/stdout)

SPEC is a line-oriented list in the style of the kernel's usr/gen_init_cpio:

    # comment
    dir   <name> <mode> <uid> <gid>
    file  <name> <location> <mode> <uid> <gid>
    nod   <name> <mode> <uid> <gid> <c|b> <major> <minor>
    slink <name> <target> <mode> <uid> <gid>

<mode> is octal permission bits (e.g. 0755); the file type comes from the keyword. Entries are
written in SPEC order (the kernel unpacks sequentially, so a directory must come before its
contents; this is checked). Names are stored without the leading "/"; names and locations
cannot contain whitespace. Relative locations are relative to the current directory. Every entry gets the same
mtime (--mtime, else $SOURCE_DATE_EPOCH, else 0), inode numbers are assigned sequentially and
nothing is taken from the host file's metadata except its contents, so identical inputs give a
byte-identical archive and no root privileges (mknod) are needed.
"""

import argparse
import os
import stat
import sys

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class SpecError(Exception):
    pass


def pad4(n):
    return (4 - n % 4) % 4


class Writer:
    def __init__(self, out, mtime):
        self.out = out
        self.mtime = mtime
        self.offset = 0
        self.ino = 720  # gen_init_cpio's numbering (first entry 721), for easy comparison

    def _write(self, data):
        self.out.write(data)
        self.offset += len(data)

    def entry(self, name, mode, uid=0, gid=0, nlink=1, data=b"", rmajor=0, rminor=0):
        is_trailer = name == TRAILER
        if not is_trailer:
            self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            0 if is_trailer else self.ino,
            mode,
            uid,
            gid,
            nlink,
            0 if is_trailer else self.mtime,
            len(data),
            0 if is_trailer else 3,  # devmajor/devminor of the "filesystem": not used by the
            0 if is_trailer else 1,  # kernel for nlink=1 entries; 3:1 as gen_init_cpio writes
            rmajor,
            rminor,
            len(encoded),
            0,  # check (only used by the "crc" format)
        )
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._write(header + encoded + b"\0" * pad4(len(header) + len(encoded)))
        self._write(data + b"\0" * pad4(len(data)))

    def trailer(self):
        self.entry(TRAILER, 0, nlink=1)
        # Pad the archive to a 512-byte multiple, as gen_init_cpio and GNU cpio do.
        self._write(b"\0" * ((512 - self.offset % 512) % 512))


def parse_mode(text, lineno):
    try:
        mode = int(text, 8)
    except ValueError:
        raise SpecError(f"line {lineno}: bad octal mode {text!r}") from None
    if mode & ~0o7777:
        raise SpecError(f"line {lineno}: mode {text} has bits outside 07777")
    return mode


def parse_int(text, lineno, what):
    try:
        value = int(text, 10)
    except ValueError:
        raise SpecError(f"line {lineno}: bad {what} {text!r}") from None
    if value < 0 or value > 0xFFFFFFFF:
        raise SpecError(f"line {lineno}: {what} {text} out of range")
    return value


def build(spec_lines, writer, base_dir):
    """Write every spec entry; relative `file` locations are resolved against base_dir."""
    seen = {""}  # names written so far ("" is the root directory)
    dirs = {""}
    for lineno, raw in enumerate(spec_lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        kind, args = words[0], words[1:]
        expected = {"dir": 4, "file": 5, "nod": 7, "slink": 5}.get(kind)
        if expected is None:
            raise SpecError(f"line {lineno}: unknown entry type {kind!r}")
        if len(args) != expected:
            raise SpecError(f"line {lineno}: {kind} takes {expected} fields, got {len(args)}")

        name = args[0].strip("/")
        if not name or any(part in ("", ".", "..") for part in name.split("/")):
            raise SpecError(f"line {lineno}: bad name {args[0]!r}")
        if name in seen:
            raise SpecError(f"line {lineno}: duplicate entry {name!r}")
        parent = name.rpartition("/")[0]
        if parent not in dirs:
            raise SpecError(f"line {lineno}: parent directory of {name!r} is not listed before it")
        seen.add(name)

        if kind == "dir":
            mode = parse_mode(args[1], lineno)
            uid, gid = (parse_int(v, lineno, "id") for v in args[2:4])
            writer.entry(name, stat.S_IFDIR | mode, uid, gid, nlink=2)
            dirs.add(name)
        elif kind == "file":
            location = os.path.join(base_dir, args[1])
            mode = parse_mode(args[2], lineno)
            uid, gid = (parse_int(v, lineno, "id") for v in args[3:5])
            try:
                with open(location, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise SpecError(f"line {lineno}: cannot read {location}: {e.strerror}") from None
            writer.entry(name, stat.S_IFREG | mode, uid, gid, data=data)
        elif kind == "nod":
            mode = parse_mode(args[1], lineno)
            uid, gid = (parse_int(v, lineno, "id") for v in args[2:4])
            if args[4] not in ("c", "b"):
                raise SpecError(f"line {lineno}: device type must be c or b, got {args[4]!r}")
            ftype = stat.S_IFCHR if args[4] == "c" else stat.S_IFBLK
            major = parse_int(args[5], lineno, "major")
            minor = parse_int(args[6], lineno, "minor")
            writer.entry(name, ftype | mode, uid, gid, rmajor=major, rminor=minor)
        elif kind == "slink":
            target = args[1]
            mode = parse_mode(args[2], lineno)
            uid, gid = (parse_int(v, lineno, "id") for v in args[3:5])
            # A symlink's "file data" is its target, without a terminating NUL (as GNU cpio
            # writes it; gen_init_cpio adds one, the kernel accepts both).
            writer.entry(name, stat.S_IFLNK | mode, uid, gid, data=target.encode())
    writer.trailer()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mtime", type=int, help="mtime of every entry (default: "
                        "$SOURCE_DATE_EPOCH, else 0)")
    parser.add_argument("spec", help="spec file, or - for stdin")
    parser.add_argument("output", help="output archive, or - for stdout")
    args = parser.parse_args()

    mtime = args.mtime
    if mtime is None:
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)

    if args.spec == "-":
        spec_lines = sys.stdin.read().splitlines()
    else:
        with open(args.spec, encoding="utf-8") as f:
            spec_lines = f.read().splitlines()
    base_dir = os.getcwd()  # like gen_init_cpio: relative locations are relative to the cwd

    try:
        if args.output == "-":
            build(spec_lines, Writer(sys.stdout.buffer, mtime), base_dir)
        else:
            with open(args.output, "wb") as out:
                build(spec_lines, Writer(out, mtime), base_dir)
    except SpecError as e:
        if args.output != "-":
            try:
                os.unlink(args.output)
            except OSError:
                pass
        print(f"mkcpio: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
