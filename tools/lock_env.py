#!/usr/bin/env python3
"""Regenerate requirements.lock and requirements-torch.lock (run from the repo root).

  python3.11 tools/lock_env.py              # fresh scratch venv, unlocked install as before, then lock it
  python3.11 tools/lock_env.py --venv .venv # lock an existing venv as it stands

The set of packages is `pip freeze --all --exclude-editable` of that venv (less pip, which the venv
brings). Each pin gets the sha256 of every file pip could pick for that version on linux x86_64
cp311 (wheels and sdists) from every index pip is configured with: PyPI (JSON API), the file://
extra-index-urls and the find-links dirs (hashed from the files on disk). torch (local CPU wheel
only) and setuptools (the build backend, needed before the sdists build) go to requirements-torch.lock.
"""
import argparse, hashlib, html, json, os, re, subprocess, sys, tempfile, urllib.request
from pathlib import Path
try:
    from packaging.utils import canonicalize_name, parse_wheel_filename, parse_sdist_filename
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip's copy will do
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename, parse_sdist_filename
    from pip._vendor.packaging.version import Version

TORCH = "torch==2.13.0"
PYPI = "https://pypi.org/pypi/{}/json"


def pip_cfg(key):
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    vals = [l.split("=", 1)[1].strip("'") for l in out.splitlines() if l.split("=", 1)[0].endswith("." + key)]
    return sorted({v for s in vals for v in s.split()})


def compatible(fn):
    """Could pip pick this file on CPython 3.11, linux x86_64 (glibc)?"""
    if not fn.endswith(".whl"):
        return fn.endswith((".tar.gz", ".zip"))
    for t in parse_wheel_filename(fn)[3]:
        py_ok = t.interpreter in ("cp311", "py3", "py311", "py2.py3") or (
            t.abi == "abi3" and re.fullmatch(r"cp3(\d+)", t.interpreter) and int(t.interpreter[3:]) <= 11
        ) or (re.fullmatch(r"py3\d+", t.interpreter) and int(t.interpreter[3:]) <= 11)
        abi_ok = t.abi in ("cp311", "abi3", "none")
        plat_ok = t.platform == "any" or (t.platform.endswith("x86_64") and t.platform.startswith(("manylinux", "linux")))
        if py_ok and abi_ok and plat_ok:
            return True
    return False


def same_version(a, b):
    try:
        return Version(a) == Version(b)
    except Exception:
        return False


def file_version(fn):
    try:
        name, ver = (parse_wheel_filename(fn)[:2] if fn.endswith(".whl") else parse_sdist_filename(fn))
        return name, ver
    except Exception:
        return None, None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def local_files(name, dirs, indexes):
    """(filename, path) for every file a find-links dir or a file:// simple index offers for `name`."""
    for d in dirs:
        for p in Path(d).glob("*"):
            yield p.name, p
    for idx in indexes:
        page = Path(idx.removeprefix("file://")) / canonicalize_name(name) / "index.html"
        if page.is_file():
            for href in re.findall(r'href="([^"#]+)', page.read_text()):
                p = (page.parent / html.unescape(href)).resolve()
                yield p.name, p


def hashes_for(name, ver, dirs, indexes):
    want, out = (canonicalize_name(name), Version(ver)), {}
    for fn, p in local_files(name, dirs, indexes):
        if file_version(fn) == want and compatible(fn) and p.is_file():
            out.setdefault(sha256(p), f"{p}")
    with urllib.request.urlopen(PYPI.format(canonicalize_name(name)), timeout=120) as r:
        rel = json.load(r)["releases"]
    for k, files in rel.items():
        if same_version(k, ver):
            for f in files:
                if compatible(f["filename"]) and not f.get("yanked"):
                    out.setdefault(f["digests"]["sha256"], f["filename"])
    return out


def fresh_venv(tmp):
    v = Path(tmp) / "venv"
    subprocess.run([sys.executable, "-m", "venv", v], check=True)
    subprocess.run([v / "bin/pip", "install", "--quiet", TORCH], check=True)
    subprocess.run([v / "bin/pip", "install", "--quiet", "-e", ".[dev]"], check=True)
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", help="lock this venv instead of building a scratch one")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(a.venv) if a.venv else fresh_venv(tmp)
        freeze = subprocess.run([venv / "bin/pip", "freeze", "--all", "--exclude-editable"],
                                capture_output=True, text=True, check=True).stdout
    pins = [l.split("==") for l in freeze.splitlines() if "==" in l and not l.startswith("#")]
    pins = [(n, v) for n, v in pins if canonicalize_name(n) != "pip"]
    dirs, indexes = pip_cfg("find-links"), [i for i in pip_cfg("extra-index-url") if i.startswith("file://")]
    head = ("# Generated by tools/lock_env.py from `pip freeze --all` of a venv built the unlocked way\n"
            "# (pip install torch==2.13.0; pip install -e '.[dev]'). Regenerate: python3.11 tools/lock_env.py\n"
            "# Hashes: every file pip could pick on linux x86_64 cp311, from PyPI and {}.\n").format(
        ", ".join(dirs + indexes))
    first, rest = [], []
    for n, v in sorted(pins, key=lambda p: canonicalize_name(p[0])):
        hs = hashes_for(n, v, dirs, indexes)
        if canonicalize_name(n) == "torch":  # the local CPU wheel only: never a CUDA build from an index
            hs = {h: s for h, s in hs.items() if s.startswith("/")}  # and v keeps its +cpu
        if not hs:
            sys.exit(f"no file found for {n}=={v}")
        print(f"{n}=={v}: {len(hs)} file(s)", file=sys.stderr)
        line = f"{n}=={v}" + "".join(f" \\\n    --hash=sha256:{h}" for h in sorted(hs))
        (first if canonicalize_name(n) in ("torch", "setuptools") else rest).append(line)
    Path("requirements-torch.lock").write_text(head + (
        "# Step 1 of `make setup`: pip install --require-hashes --no-deps -r requirements-torch.lock\n"
        "# torch 2.13.0, pinned as +cpu with only the local CPU wheel's hash (/opt/wheels): no index\n"
        "# (PyPI has no +cpu builds) can hand pip a CUDA build.\n"
        "# setuptools: torch needs it, and it must be in the venv before step 2 builds the sdist-only\n"
        "# packages without build isolation (so their build backend is this pinned setuptools too).\n")
        + "\n".join(first) + "\n")
    Path("requirements.lock").write_text(head + (
        "# Step 2 of `make setup` (after requirements-torch.lock, which pins torch and setuptools):\n"
        "#   pip install --require-hashes --no-deps --no-build-isolation -r requirements.lock\n")
        + "\n".join(rest) + "\n")

if __name__ == "__main__":
    main()
