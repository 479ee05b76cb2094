"""The docker backend's runtime image, built locally ``FROM scratch`` (no registry, never a pull).

The build context is assembled here and streamed to the engine: ``sandbox/Dockerfile`` plus a
``rootfs/`` holding exactly what the worker needs and nothing else:

* the host's Python interpreter (``/usr/local/bin/python3.X``) and its standard library (minus
  tests, IDLE, tkinter, ensurepip, site-packages and extension modules that need X11 or curses);
* the shared libraries they and the packages below load, found with ``ldd`` (``/usr/lib``), and
  the dynamic loader;
* the files of an explicit list of distributions (:data:`WORKER_DISTRIBUTIONS`: torch CPU,
  numpy, safetensors, tokenizers, jinja2, pydantic and their runtime needs), under
  ``/opt/secure-run/site``, without headers, tests, static libraries or tool binaries;
* our worker packages (``.py`` only) under ``/opt/secure-run/code``; a minimal ``/etc``.

The image is tagged ``secure-run-sandbox:<digest>``, where the digest covers the Dockerfile and
our code by content and every other file by (path, mode, size, mtime) (bytecode caches excluded)
— so it is built once and reused until something that goes into it changes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from secure_run.errors import SandboxError

from ..errors import ImageMissing
from ..policy import JIT_CACHE_MOUNT, MODEL_MOUNT, SCRATCH_MOUNT
from .layout import OPT, code_files

__all__ = ["DIGEST_LABEL", "IMAGE_REPO", "ImagePlan", "check_image", "ensure_image", "ensure_image_id", "image_tag",
           "plan_host_image", "plan_image"]

IMAGE_REPO = "secure-run-sandbox"
SITE_DIR = f"{OPT}/site"
PYTHON_IN_IMAGE = "/usr/local/bin/python3"
#: Distributions copied into the image: what the worker imports, and what torch imports at run time.
WORKER_DISTRIBUTIONS = (
    "torch", "numpy", "safetensors", "tokenizers", "jinja2", "MarkupSafe",
    "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions",
    "filelock", "fsspec", "sympy", "mpmath",  # torch's own run-time imports (sympy lazily)
)
# (secure_run.manifests imports its signing stack lazily: the loader's strict header check needs no
# cryptography inside the sandbox.)
#: Parts of those distributions the worker never uses.
_DIST_EXCLUDE = re.compile(r"^(torch/(include|test|share)/|torch/bin/(?!torch_shm_manager$)|.*\.a$|.*\.pyi$|.*/tests?/)")
_STDLIB_EXCLUDE_DIRS = frozenset({"site-packages", "dist-packages", "test", "idlelib", "tkinter", "turtledemo",
                                  "ensurepip", "lib2to3", "pydoc_data"})
_DYNLOAD_EXCLUDE = re.compile(r"^(_tkinter|readline|_curses|_curses_panel|_dbm|_gdbm|nis|_crypt)\.")
_OPT_PYC = re.compile(r".*\.opt-[12]\.pyc$")
_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)$")
_ETC = {
    "etc/passwd": "root:x:0:0::/:/bin/false\nnobody:x:65534:65534::/tmp:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}


@dataclass(frozen=True)
class Entry:
    """One member of ``rootfs/``: a file (from the host or inline bytes), a directory or a symlink."""

    dst: str  # relative to rootfs/, no leading slash
    mode: int
    src: Path | None = None
    data: bytes | None = None
    link: str | None = None
    hash_content: bool = False


@dataclass(frozen=True)
class ImagePlan:
    """Everything that goes into the image, in a fixed order."""

    dockerfile: bytes
    entries: tuple[Entry, ...]

    @functools.cached_property
    def digest(self) -> str:
        """sha256 over the Dockerfile and every entry (content for ours, identity for the rest).

        Compiled bytecode (``__pycache__``) is copied but not hashed: it is a cache derived from the
        hashed sources, and Python adds files there whenever a module is first imported on the host.
        """
        h = hashlib.sha256(b"secure-run-image-v1\0" + self.dockerfile + b"\0")
        for e in self.entries:
            if "/__pycache__" in e.dst:
                continue
            h.update(f"{e.dst}\0{e.mode:o}\0".encode())
            if e.link is not None:
                h.update(b"L" + e.link.encode())
            elif e.data is not None:
                h.update(b"D" + hashlib.sha256(e.data).digest())
            elif e.src is not None:
                if e.hash_content:
                    h.update(b"C" + hashlib.sha256(e.src.read_bytes()).digest())
                else:
                    st = e.src.stat()
                    h.update(f"S{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(b"\n")
        return h.hexdigest()

    @property
    def tag(self) -> str:
        """``secure-run-sandbox:<first 16 hex digits of the digest>`` (``host-`` before them for the host runtime)."""
        kind = "host-" if self.dockerfile.endswith(b"# runtime: host\n") else ""
        return f"{IMAGE_REPO}:{kind}{self.digest[:16]}"


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _ldd(paths: list[Path]) -> dict[str, Path]:
    """soname -> host path of every shared library the ELF files in ``paths`` load."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for i in range(0, len(paths), 64):
        batch = [str(p) for p in paths[i:i + 64]]
        res = subprocess.run(["ldd", *batch], capture_output=True, text=True, check=False,
                             env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
        current = batch[0] if len(batch) == 1 else ""
        for line in res.stdout.splitlines():
            if not line.startswith(("\t", " ")):
                current = line.rstrip(":")
                continue
            if "not found" in line:
                missing.append(f"{current}: {line.strip()}")
                continue
            m = _LDD_LINE.match(line)
            if m:
                found.setdefault(m.group(1), Path(m.group(2)))
    if missing:
        raise SandboxError("shared libraries needed by the worker are missing on this host",
                           details=missing[:10], rule="sandbox.image.libraries",
                           hint="install them, or exclude the module that needs them")
    return found


def _tree(src: Path, dst: str, *, skip_dirs: frozenset[str] = frozenset(),
          skip_file: re.Pattern[str] | None = None) -> Iterator[Entry]:
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("config-"))
        rel = Path(dirpath).relative_to(src).as_posix()
        base = dst if rel == "." else f"{dst}/{rel}"
        yield Entry(dst=base, mode=0o755)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if skip_file is not None and rel == "lib-dynload" and skip_file.match(name):
                continue
            if _OPT_PYC.match(name):
                continue
            if path.is_symlink() and not path.exists():
                continue
            yield Entry(dst=f"{base}/{name}", mode=0o755 if os.access(path, os.X_OK) else 0o644, src=path)


def _dist_entries(name: str) -> Iterator[Entry]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise SandboxError(f"the worker needs the Python distribution {name!r}, which is not installed",
                           rule="sandbox.image.distribution", hint="run scripts/bootstrap") from None
    dirs: set[str] = set()
    for f in sorted(dist.files or [], key=str):
        rel = f.as_posix()
        if rel.startswith("..") or _DIST_EXCLUDE.match(rel) or _OPT_PYC.match(rel):
            continue
        path = Path(str(dist.locate_file(f)))
        if not path.is_file():
            continue
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                yield Entry(dst=f"{SITE_DIR.lstrip('/')}/{d}", mode=0o755)
        yield Entry(dst=f"{SITE_DIR.lstrip('/')}/{rel}", mode=0o755 if os.access(path, os.X_OK) else 0o644, src=path)


@functools.cache
def _code_and_etc_entries() -> list[Entry]:
    """secure-run's own worker code (content-hashed) and the image's fixed /etc files, in both layouts."""
    entries: list[Entry] = []
    for src, dst in code_files():
        parent = dst.rsplit("/", 1)[0]
        entries.append(Entry(dst=parent.lstrip("/"), mode=0o755))
        entries.append(Entry(dst=dst.lstrip("/"), mode=0o644, src=src, hash_content=True))
    for rel, text in _ETC.items():
        entries.append(Entry(dst=rel, mode=0o644, data=text.encode()))
    return entries


def plan_image() -> ImagePlan:
    """Work out the image's contents from this host's Python installation."""
    dockerfile = resources.files("secure_run.sandbox").joinpath("Dockerfile").read_bytes()
    python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(os.path.realpath(sysconfig.get_path("stdlib")))
    entries: list[Entry] = []
    for d in ("tmp", "dev", "proc", "sys", "etc", "lib64", "usr", "usr/lib", "usr/local", "usr/local/bin",
              "usr/local/lib", "opt", OPT.lstrip("/"), MODEL_MOUNT.lstrip("/"), "var", "var/cache",
              JIT_CACHE_MOUNT.lstrip("/")):
        # the engine copies the image directory's mode onto a tmpfs mounted over it (tmpcopyup):
        # both tmpfs mount points must be world-writable and sticky in the image itself
        sticky = d in (SCRATCH_MOUNT.lstrip("/"), JIT_CACHE_MOUNT.lstrip("/"))
        entries.append(Entry(dst=d, mode=0o1777 if sticky else 0o755))
    entries.append(Entry(dst=f"usr/local/bin/python{ver}", mode=0o755, src=python))
    entries.append(Entry(dst="usr/local/bin/python3", mode=0o777, link=f"python{ver}"))
    entries.extend(_tree(stdlib, f"usr/local/lib/python{ver}", skip_dirs=_STDLIB_EXCLUDE_DIRS,
                         skip_file=_DYNLOAD_EXCLUDE))
    for name in WORKER_DISTRIBUTIONS:
        entries.extend(_dist_entries(name))
    entries.extend(_code_and_etc_entries())
    elves = [e.src for e in entries if e.src is not None and (e.src.suffix == ".so" or ".so." in e.src.name
                                                             or e.src == python) and _is_elf(e.src)]
    inside = {str(e.src) for e in entries if e.src is not None}
    libs = _ldd(elves)
    for soname, path in sorted(libs.items()):
        if str(path) in inside or str(Path(os.path.realpath(path))) in inside:
            continue
        if "ld-linux" in soname:
            continue
        entries.append(Entry(dst=f"usr/lib/{soname}", mode=0o755, src=Path(os.path.realpath(path))))
    loader = Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))
    entries.append(Entry(dst="lib64/ld-linux-x86-64.so.2", mode=0o755, src=loader))
    seen: set[str] = set()
    unique = []
    for e in entries:
        if e.dst not in seen:
            seen.add(e.dst)
            unique.append(e)
    return ImagePlan(dockerfile=dockerfile, entries=tuple(unique))


@functools.cache
def plan_host_image() -> ImagePlan:
    """The ``host`` runtime's image: our code, ``/etc`` and mount points only (tag ``host-<digest>``).

    The interpreter, the libraries, the worker's site-packages (and on GPU hosts the CUDA stack
    and Triton's C toolchain) are bound read-only from the host at run time, exactly as the
    namespace backend does (``namespace_backend.runtime_layout``): used where copying the CUDA
    stack into an image is impractical (GPU hosts without the NVIDIA container runtime).
    """
    dockerfile = resources.files("secure_run.sandbox").joinpath("Dockerfile").read_bytes()
    entries: list[Entry] = []
    for d in ("tmp", "dev", "proc", "sys", "etc", "opt", OPT.lstrip("/"), MODEL_MOUNT.lstrip("/"), "var",
              "var/cache", JIT_CACHE_MOUNT.lstrip("/")):
        sticky = d in (SCRATCH_MOUNT.lstrip("/"), JIT_CACHE_MOUNT.lstrip("/"))
        entries.append(Entry(dst=d, mode=0o1777 if sticky else 0o755))
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        if os.path.islink(f"/{name}"):
            entries.append(Entry(dst=name, mode=0o777, link=os.readlink(f"/{name}")))
    entries.extend(_code_and_etc_entries())
    if os.path.isfile("/etc/ld.so.cache"):
        entries.append(Entry(dst="etc/ld.so.cache", mode=0o644, data=Path("/etc/ld.so.cache").read_bytes()))
    seen: set[str] = set()
    unique = []
    for e in entries:
        if e.dst not in seen:
            seen.add(e.dst)
            unique.append(e)
    return ImagePlan(dockerfile=dockerfile + b"# runtime: host\n", entries=tuple(unique))


def image_tag() -> str:
    """The tag the current build inputs give."""
    return plan_image().tag


def _write_context(plan: ImagePlan, out: io.BufferedWriter) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size, info.mode = len(plan.dockerfile), 0o644
        tar.addfile(info, io.BytesIO(plan.dockerfile))
        for e in plan.entries:
            info = tarfile.TarInfo(f"rootfs/{e.dst}")
            info.mode, info.uid, info.gid, info.uname, info.gname = e.mode, 0, 0, "root", "root"
            if e.link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, e.link
                tar.addfile(info)
            elif e.data is not None:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            elif e.src is not None:
                st = e.src.stat()
                info.size, info.mtime = st.st_size, int(st.st_mtime)
                with open(e.src, "rb") as f:
                    tar.addfile(info, f)
            else:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)


#: Image label holding the digest of the build inputs.
DIGEST_LABEL = "org.secure-run.digest"


def _record_path() -> Path:
    """Where the ids of the images this user built are recorded (``$XDG_CACHE_HOME/secure-run``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "secure-run" / "sandbox-images.json"


def _recorded() -> dict[str, str]:
    try:
        data = json.loads(_record_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _record(digest: str, image_id: str) -> None:
    """Remember that the build of ``digest`` produced ``image_id`` (atomic replace; best effort)."""
    path = _record_path()
    data = _recorded()
    data[digest] = image_id
    from secure_run.errors import EnvironmentProblem
    from secure_run.manifests._atomic import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, (json.dumps(dict(sorted(data.items())[-64:]), indent=1) + "\n").encode("utf-8"),
                     mode=0o600, action="record the sandbox image id in")
    except (OSError, EnvironmentProblem):
        pass  # best effort: without the record the next run refuses the image and rebuilds it (check_image)


def check_image(image: Any, plan: ImagePlan) -> None:
    """Refuse an image under our tag that is not the one our build produced (rule ``sandbox.image.digest``).

    The image's content id (``sha256:`` of its config, which names every layer's content digest)
    must equal the id recorded when this user built it from the same inputs, and its digest
    label must match the inputs. A different image retagged as ours fails both.
    """
    label = (image.labels or {}).get(DIGEST_LABEL)
    want = _recorded().get(plan.digest)
    problems = []
    if label != plan.digest:
        problems.append(f"label {DIGEST_LABEL} is {label!r}, expected {plan.digest!r}")
    if want is None:
        problems.append("no build of these inputs is recorded for this user")
    elif image.id != want:
        problems.append(f"content id {image.id}, but the build recorded {want}")
    if problems:
        raise SandboxError(f"the image tagged {plan.tag} is not the sandbox image secure-run built",
                           details=problems, rule="sandbox.image.digest",
                           hint="let secure-run rebuild it: `secure-run sandbox build-image` (or run without --no-build); "
                           f"never tag other images as {IMAGE_REPO}")


def ensure_image(client: Any, *, build: bool, runtime: str = "image") -> str:
    """The runtime image's tag, building it first when missing (or not ours) and ``build`` is true.

    The image under the tag is checked by content id (:func:`check_image`); containers are
    created from :func:`ensure_image_id`'s id, so a tag moved after the check changes nothing.

    Raises:
        ImageMissing: not present and ``build`` is false.
        SandboxError: the image under our tag is not the one we built and ``build`` is false (rule
            ``sandbox.image.digest``), or the build failed (rule ``sandbox.image.build``).
    """
    return _ensure(client, build=build, runtime=runtime)[0]


def ensure_image_id(client: Any, *, build: bool, runtime: str = "image") -> str:
    """Like :func:`ensure_image`, but the checked image's content id (``sha256:...``)."""
    return _ensure(client, build=build, runtime=runtime)[1]


def _ensure(client: Any, *, build: bool, runtime: str) -> tuple[str, str]:
    import docker

    plan = plan_host_image() if runtime == "host" else plan_image()
    try:
        image = client.images.get(plan.tag)
        try:
            check_image(image, plan)
            return plan.tag, str(image.id)
        except SandboxError:
            if not build:
                raise
    except docker.errors.ImageNotFound:
        if not build:
            raise ImageMissing(plan.tag) from None
    try:
        with tempfile.TemporaryFile(prefix="secure-run-context-") as ctx:
            _write_context(plan, ctx)  # type: ignore[arg-type]
            ctx.seek(0)
            try:
                client.images.build(fileobj=ctx, custom_context=True, tag=plan.tag, pull=False, rm=True,
                                    forcerm=True, network_mode="none", labels={DIGEST_LABEL: plan.digest})
            except docker.errors.BuildError as err:
                log = [str(x.get("stream") or x.get("error") or "").strip() for x in err.build_log]
                raise SandboxError("building the sandbox image failed", details=[x for x in log if x][-10:],
                                   rule="sandbox.image.build", hint="see the build log above") from None
            except docker.errors.APIError as err:  # e.g. the engine's disk is full
                raise SandboxError(f"the Docker engine refused to build the sandbox image: {err.explanation or err}",
                                   rule="sandbox.image.build",
                                   hint="check the engine's free disk space (docker system df), then retry") from None
    except OSError as err:  # the build context in the temporary folder (disk full, read-only /tmp)
        from secure_run.manifests._io import storage_error

        raise storage_error(err, "write the sandbox image's build context to", tempfile.gettempdir()) from None
    image = client.images.get(plan.tag)
    _record(plan.digest, str(image.id))
    check_image(image, plan)
    prune_images(client, keep=plan.tag)
    return plan.tag, str(image.id)


def prune_images(client: Any, *, keep: str, min_age_s: float = 3600.0, repo: str = IMAGE_REPO) -> list[str]:
    """Remove older ``secure-run-sandbox`` builds (at least ``min_age_s`` old, not in use); best effort.

    Images younger than ``min_age_s`` are kept, so that concurrent runs from another checkout are not
    disturbed.
    """
    import datetime

    import docker

    now = datetime.datetime.now(datetime.UTC)
    removed = []
    for img in client.images.list(name=repo):
        if keep in img.tags:
            continue
        try:
            created = datetime.datetime.fromisoformat(str(img.attrs.get("Created", ""))[:26].rstrip("Z") + "+00:00")
        except ValueError:
            continue
        if (now - created).total_seconds() < min_age_s:
            continue
        try:
            client.images.remove(img.id, noprune=False)
            removed.extend(img.tags)
        except docker.errors.APIError:
            continue  # in use, or already gone
    return removed
