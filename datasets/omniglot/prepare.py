"""Prepare Omniglot few-shot splits: fetch, verify, split, write (see readme.md).

Usage: sh datasets/omniglot/run.sh [--protocol paddlerec|vinyals|lake] [--out DIR]
Env:   OMNIGLOT_MIRROR  folder / file:// / http(s):// prefix holding both archives
"""
import argparse
import os
import sys
import zipfile

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from omniglot_prep import PrepareError  # noqa: E402
from omniglot_prep import protocols, sources, splits, verify  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Prepare Omniglot few-shot splits.")
    parser.add_argument("--protocol", choices=sorted(protocols.PROTOCOLS), default="paddlerec",
                        help="which characters go to which split (default: paddlerec)")
    parser.add_argument("--out", default=HERE,
                        help="where the split folders (and raw/ downloads) go; default: this folder")
    return parser.parse_args(argv)


def split_dirs(out_dir, protocol):
    return {split: os.path.join(out_dir, protocols.folder_name(protocol, split))
            for split in protocol.sizes}


def load_archives(paths):
    """Verify both archives; return (open ZipFiles, {archive: [(alphabet, character)]}, sources)."""
    zips, chars, sources_ = {}, {}, {}
    for name, path in paths.items():
        listing = verify.list_characters(name, path)
        print(f"{name}: {len(listing)} characters OK, {verify.md5_note(name, path)}")
        zips[name] = zipfile.ZipFile(path)
        chars[name] = list(listing)
        for key, members in listing.items():
            if key in sources_:
                raise PrepareError(f"{name}: character {'/'.join(key)} also in the other archive")
            sources_[key] = (zips[name], members)
    return zips, chars, sources_


def summary(protocol, dirs):
    lines = [f"Omniglot, protocol {protocol.name}:"]
    for split, path in dirs.items():
        chars, images, _ = splits.count(path)
        lines.append(f"  {split:<5} {chars:>5} characters {images:>6} images  {path}")
    return "\n".join(lines)


def run(argv=None):
    args = parse_args(argv)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    protocol = protocols.PROTOCOLS[args.protocol]
    for name in splits.clean_leftovers(out_dir):
        print(f"removed {name} left by an interrupted run")
    dirs = split_dirs(out_dir, protocol)
    todo = [s for s, path in dirs.items() if not splits.is_complete(path, protocol.sizes[s])]
    if not todo:
        print(f"All {protocol.name} splits already complete in {out_dir}: nothing to do.")
        print(summary(protocol, dirs))
        return 0
    for split in todo:
        if os.path.isdir(dirs[split]):  # e.g. a split of an older version of the protocol: replaced, never mixed
            chars, _, odd = splits.count(dirs[split])
            extra = f" ({odd} without {verify.IMAGES_PER_CHARACTER} images)" if odd else ""
            print(f"{dirs[split]}: {chars} characters{extra}, expected {protocol.sizes[split]}: writing it again")
    paths = sources.locate(os.path.join(out_dir, "raw"))
    zips, chars, sources_ = load_archives(paths)
    try:
        assigned = protocol.assign(chars["images_background.zip"], chars["images_evaluation.zip"])
        for split in todo:
            # disable=None: a bar on a terminal only, none in a log file (where it would garble the lines after it).
            with tqdm(total=len(assigned[split]), unit="char", desc=f"writing {split}", disable=None) as bar:
                splits.write_split(out_dir, os.path.basename(dirs[split]), assigned[split],
                                   sources_, progress=bar)
    finally:
        for zf in zips.values():
            zf.close()
    print(summary(protocol, dirs))
    return 0


def main(argv=None):
    try:
        return run(argv)
    except PrepareError as exc:
        print(f"prepare.py: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --out not writable or unreadable, a disk full: the message names the path
        print(f"prepare.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare.py: interrupted; no partial split was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
