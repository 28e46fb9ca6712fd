"""Make asv's published HTML work without the internet: local copies of the scripts it loads.

asv 0.6's ``index.html`` loads jQuery, flot, stupidtable, blueimp-md5 and Bootstrap from CDNs and
ships none of them; offline, the page shows only "external JavaScript dependencies failed to
load".  This fetches the same versions once with npm (``npm pack``; kept in
``asv_benches/.asv/vendor/``, outside the repository), copies them into the published folder and
points ``index.html`` at the copies.  After that, ``asv preview`` works offline, until the next
``asv publish`` rewrites ``index.html`` (run this again; the copies are reused, npm is not asked).

    cd asv_benches && asv publish && python ../benchmarks/asv_offline.py && asv preview

stupidtable 1.0.1 (asv's CDN choice) is not on npm; ``stupid-table-plugin`` 1.1.3, the same
jQuery plugin, stands in for it.
"""
import argparse
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ASV_DIR = Path(__file__).resolve().parents[1] / "asv_benches"
#: tarfile's "data" filter (no links out of the folder, no devices) where Python has it
#: (3.10.12, 3.11.4 and later).
_SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}

#: CDN address in asv's index.html -> (npm package@version, the file in that package).
ASSETS = {
    "https://code.jquery.com/jquery-3.3.1.min.js": ("jquery@3.3.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js":
        ("flot@0.8.3", "jquery.flot.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js":
        ("flot@0.8.3", "jquery.flot.time.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js":
        ("flot@0.8.3", "jquery.flot.selection.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js":
        ("flot@0.8.3", "jquery.flot.categories.js"),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        ("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js":
        ("blueimp-md5@2.19.0", "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js":
        ("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        ("bootstrap@3.1.1", "dist/css/bootstrap.min.css"),
}
#: Folders a copied file refers to (Bootstrap's stylesheet loads ../fonts/).
COMPANIONS = {"bootstrap@3.1.1": ["dist/fonts"]}


def fetch(package, cache):
    """The unpacked npm package ``package`` (name@version), fetched into ``cache`` once."""
    folder = cache / package
    if folder.is_dir():
        return folder / "package"
    if shutil.which("npm") is None:
        raise SystemExit(f"asv_offline: {package} is not in {cache} and npm is not installed")
    cache.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "pack", package, "--silent"], cwd=cache, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"asv_offline: npm pack {package} failed:\n{out.stderr.strip()}")
    tarball = cache / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, **_SAFE_EXTRACT)
    tarball.unlink()
    return folder / "package"


def localize(html_dir, cache):
    """Copy the assets into ``html_dir``/vendor and point its index.html at them."""
    index = html_dir / "index.html"
    if not index.is_file():
        raise SystemExit(f"asv_offline: no {index}: run 'asv publish' first")
    text = index.read_text()
    for url, (package, name) in ASSETS.items():
        source, target = fetch(package, cache), html_dir / "vendor" / package
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
        for folder in COMPANIONS.get(package, []):
            shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
        if url not in text:
            print(f"asv_offline: {url} is not in {index} (another asv version?); left as is")
            continue
        # The CDN file's integrity hash does not hold for the npm copy (not minified alike).
        tag = re.compile(r'<(script|link)\b[^>]*?' + re.escape(url) + r'[^>]*>')
        text = tag.sub(lambda m: _local_tag(m.group(0), url, f"vendor/{package}/{name}"), text)
    index.write_text(text)
    print(f"asv_offline: {index} now loads its scripts from {html_dir / 'vendor'}")


def _local_tag(tag, url, path):
    tag = tag.replace(url, path)
    return re.sub(r'\s(integrity|crossorigin|referrerpolicy)="[^"]*"', "", tag)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html-dir", type=Path, default=ASV_DIR / ".asv" / "html",
                        help="the folder 'asv publish' wrote (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=ASV_DIR / ".asv" / "vendor",
                        help="where the npm packages are kept (default: %(default)s)")
    args = parser.parse_args(argv)
    localize(args.html_dir, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
