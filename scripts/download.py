"""Fetch released checkpoints and pretrained weights by name, laid out where the loaders look for them.

    python scripts/download.py --list                                 # every name, what it is, where it lands
    python scripts/download.py rqvae-ffhq rqtransformer-ffhq          # one archive for both names
    python scripts/sample.py -v rqvae-ffhq -a rqtransformer-ffhq -n 16 --output samples/
    python scripts/download.py inception lpips                        # FID and LPIPS weights, into torch's hub cache
    python scripts/download.py llamagen-vq16 --dir /data/weights      # into /data/weights/llamagen-vq16/

Model checkpoints go to $ARGEN_CACHE/checkpoints/<folder>/ (default ~/.cache/argen/checkpoints/), where every
entry script finds them when given the name in place of a path (-v rqvae-ffhq, --vae_path kl16, --resume
mar-base); the Inception and VGG16 weights go to torch's hub cache ($TORCH_HOME/hub/checkpoints/), where the
metrics and LPIPS look. With --dir the files go under DIR instead (give their paths then). A file already
there is not fetched again; an interrupted download resumes from its .part file; the SHA-256 is checked
where the publisher gives one (a mismatch removes the file); RQ-VAE archives are unpacked and removed.
Only this script downloads: no other script fetches anything.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.download import fetch, unpack  # noqa: E402
from common.errors import ConfigError, WeightsError, cli_entry  # noqa: E402
from common.paths import check_output_dir  # noqa: E402
from common.releases import RELEASES, Release  # noqa: E402
from common.weights import release_dir  # noqa: E402


def fetch_release(release: Release, root: str | None) -> str:
    """Fetch the files of `release` that are not there yet (under `root`, else where the loaders look); returns
    the path of the file its name stands for."""
    folder = release_dir(release, root)
    check_output_dir(folder, "--dir" if root else "the download folder (ARGEN_CACHE or TORCH_HOME move it, or --dir)")
    target = os.path.join(folder, release.target)
    for file in release.files:
        destination = os.path.join(folder, file.name)
        if file.archive and os.path.isfile(target):  # unpacked before, by this release or its archive's other one
            continue
        if os.path.isfile(destination):
            print(f"{release.name}: {file.name} is already there")
        else:
            print(f"{release.name}: {file.name} ({fetch(file.url, destination, file.sha256)})")
        if file.archive:
            unpack(destination, folder)
    if not os.path.isfile(target):
        raise WeightsError(f"{release.name}: the published files hold no {release.target} (looked in {folder}); "
                           "the release changed its layout, report it")
    return target


def describe(release: Release) -> str:
    """One line of --list: name, what it is, its checksum, where it lands (and whether it is there)."""
    first = release.files[0]
    if first.sha256:
        checksum = "SHA-256 in the catalogue" if len(first.sha256) == 64 else "SHA-256 prefix in the file name"
    else:
        checksum = "SHA-256 from the host" if "huggingface.co" in first.url else "no published SHA-256"
    target = os.path.join(release_dir(release), release.target)
    state = "downloaded" if os.path.isfile(target) else "not downloaded"
    return f"{release.name:<28} {release.description}; {release.publisher}; {checksum}; {target} ({state})"


@cli_entry
def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="released checkpoints to fetch (see --list)")
    parser.add_argument("--dir", default=None,
                        help="put the files under DIR (default: where the loaders look for a name)")
    parser.add_argument("--list", action="store_true", help="list every name and where it lands")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(describe(release) for release in RELEASES.values()))
        return []
    if not args.names:
        raise ConfigError("name the release(s) to fetch, e.g. python scripts/download.py kl16 (--list shows them)")
    unknown = [name for name in args.names if name not in RELEASES]
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a released checkpoint; the names are {', '.join(RELEASES)}")
    paths = [fetch_release(RELEASES[name], args.dir) for name in args.names]
    for name, path in zip(args.names, paths):
        use = "give this path where a checkpoint is taken" if args.dir else f"give {name} or this path"
        print(f"{name}: {path} ({use})")
    return paths


if __name__ == "__main__":
    main()
