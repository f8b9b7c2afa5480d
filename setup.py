"""Builds pgpilot's optional C extensions; without a compiler pgpilot installs without them.

Two extensions: the pooler's fast path, and ``nplusone/_stackwalk.c``, the query doctor's
per-statement stack key (``nplusone/callsite.py`` has a pure-Python version of it).

The engine is one translation unit: ``_fastpath.c`` includes the role files of
``proxy/engine/`` in order (so that static functions inline across them); they are listed in
``depends`` so that an edit to any of them rebuilds it (MANIFEST.in ships them in the sdist).
With OpenSSL's headers (libssl-dev) the engine is built with TLS (``engine/tls.c``,
``PGPILOT_TLS``) and linked to libssl/libcrypto; without them it is built without, and the
pooler keeps TLS connections on Python's own path (a notice says so at the pooler's start).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _openssl_flags() -> tuple[list[str], list[str], list[str]] | None:
    """(include dirs, library dirs, libraries) to build against OpenSSL, or None when its
    headers are not found (pkg-config, or a compile test with the compiler's defaults)."""
    if os.environ.get("PGPILOT_NO_TLS"):
        return None
    if shutil.which("pkg-config"):
        try:
            cflags = subprocess.run(["pkg-config", "--cflags", "openssl"], capture_output=True,
                                    text=True, check=True).stdout.split()
            libs = subprocess.run(["pkg-config", "--libs", "openssl"], capture_output=True,
                                  text=True, check=True).stdout.split()
            return ([f[2:] for f in cflags if f.startswith("-I")],
                    [f[2:] for f in libs if f.startswith("-L")],
                    [f[2:] for f in libs if f.startswith("-l")] or ["ssl", "crypto"])
        except (OSError, subprocess.CalledProcessError):
            pass
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <openssl/ssl.h>\nint main(void) { return SSL_CTX_new(NULL) != 0; }\n")
        try:
            ok = subprocess.run([cc, src, "-o", os.path.join(tmp, "t"), "-lssl", "-lcrypto"],
                                capture_output=True, check=False).returncode == 0
        except OSError:
            ok = False
    return ([], [], ["ssl", "crypto"]) if ok else None


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python pooler, with a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001
            print(f"warning: pgpilot's C fast path was not built ({exc}); using pure Python")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: could not build {ext.name} ({exc}); using pure Python")


_tls = _openssl_flags()
if _tls is None and "build_ext" in sys.argv:
    print("notice: OpenSSL headers not found (libssl-dev): the fast path is built without TLS")
_ext = Extension(
    "pgpilot.proxy._fastpath", ["src/pgpilot/proxy/_fastpath.c"],
    depends=sorted(glob.glob("src/pgpilot/proxy/engine/*.[ch]")),
    extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
    define_macros=[("PGPILOT_TLS", "1")] if _tls else [],
    include_dirs=_tls[0] if _tls else [],
    library_dirs=_tls[1] if _tls else [],
    libraries=_tls[2] if _tls else [],
    optional=True)

_stackwalk = Extension(
    "pgpilot.nplusone._stackwalk", ["src/pgpilot/nplusone/_stackwalk.c"],
    extra_compile_args=["-O2", "-Wall"],
    optional=True)

setup(ext_modules=[_ext, _stackwalk], cmdclass={"build_ext": OptionalBuildExt})
