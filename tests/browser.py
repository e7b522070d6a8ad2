"""Headless Chromium for the HTML report tests, installed without root from Debian packages into the medsr cache.

``apt-get download`` fetches ``chromium-headless-shell`` and ``chromium-common`` (its ICU data, V8 snapshot and
resource packs) and ``dpkg -x`` unpacks them into ``<cache>/browser`` (``$MEDSR_CACHE/browser`` when that is set,
see ``medsr.samples.cache_dir``), as ``medsr.samples`` installs data packages. Shared libraries that ``ldd`` then
reports missing come from the ``lib*`` dependencies of the packages unpacked so far that are not installed
system-wide, fetched the same way, round after round, until none is missing; the loader finds them through
``LD_LIBRARY_PATH``. The whole tree is unpacked in a temporary folder and renamed into place when complete, so an
interrupted install leaves nothing that looks installed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from medsr.samples import cache_dir

_PACKAGES = ("chromium-headless-shell", "chromium-common")
_BINARY = Path("usr/lib/chromium/chromium-headless-shell")
_ROUNDS = 8  # dependency rounds before giving up; libpulse0 -> libsndfile1 -> codecs takes 3 on Debian 12


@dataclasses.dataclass(frozen=True)
class Browser:
    """An unpacked chromium-headless-shell and the environment it needs."""

    binary: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run it headless (no sandbox: tests may run as root or in containers without user namespaces)."""
        command = [str(self.binary), "--headless", "--no-sandbox", "--disable-gpu", *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)


def install_browser() -> Browser:
    """The cached browser, installing it first if needed; RuntimeError with the reason if that fails."""
    root = cache_dir() / "browser"
    if (root / _BINARY).is_file() and not _missing_libraries(root):
        return _browser(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".browser.", dir=root.parent))  # same filesystem: the rename is atomic
    try:
        fetched: set[str] = set()
        wanted = set(_PACKAGES)
        for _ in range(_ROUNDS):
            _download_and_unpack(sorted(wanted), work)
            fetched |= wanted
            missing = _missing_libraries(work)
            if not missing:
                break
            wanted = {p for p in _dependencies(sorted(wanted)) if p.startswith("lib") and p not in fetched}
            wanted -= _installed(sorted(wanted))
            if not wanted:
                raise RuntimeError(f"{_BINARY.name} still lacks {missing} and no dependency is left to fetch")
        else:
            raise RuntimeError(f"{_BINARY.name} still lacks {missing} after {_ROUNDS} rounds of dependencies")
        if root.exists():  # an older or broken install
            shutil.rmtree(root)
        os.replace(work, root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _browser(root)


def _browser(root: Path) -> Browser:
    return Browser(root / _BINARY, os.environ | {"LD_LIBRARY_PATH": _library_path(root)})


def _library_path(root: Path) -> str:
    """Every unpacked folder holding shared libraries (libpulse0 keeps one in a pulseaudio/ subfolder), then the
    caller's own LD_LIBRARY_PATH."""
    folders = sorted({str(p.parent) for p in root.rglob("*.so*") if p.is_file()})
    return os.pathsep.join([*folders, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])


def _missing_libraries(root: Path) -> list[str]:
    """Sonames that ``ldd`` cannot find for the browser binary with the unpacked libraries on the path."""
    env = os.environ | {"LD_LIBRARY_PATH": _library_path(root)}
    output = _run(["ldd", str(root / _BINARY)], env=env)
    return sorted(set(re.findall(r"^\s*(\S+) => not found", output, flags=re.MULTILINE)))


def _download_and_unpack(packages: list[str], root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root.parent) as debs:
        _run(["apt-get", "download", *packages], cwd=Path(debs))
        for deb in sorted(Path(debs).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(root)])


def _dependencies(packages: list[str]) -> set[str]:
    """Direct Depends (every alternative) of the candidate versions; virtual packages, shown as <name>, skipped."""
    skip = ["--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"]
    output = _run(["apt-cache", "depends", *skip, *packages])
    return set(re.findall(r"^\s*\|?(?:Pre)?Depends: ([^<\s]+)", output, flags=re.MULTILINE))


def _installed(packages: list[str]) -> set[str]:
    """The packages that dpkg knows as installed system-wide (their libraries are on the default path)."""
    if not packages:
        return set()
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages], capture_output=True, text=True
    )  # exit 1 when some package is unknown: its line is missing, which is what we want
    return {line.split()[0] for line in result.stdout.splitlines() if line.endswith(" installed")}


def _run(command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command, return its stdout; RuntimeError naming the command and its output when it fails or is absent."""
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise RuntimeError(
            f"`{command[0]}` not found: installing the test browser needs Debian's apt and dpkg"
        ) from error
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout
