"""Builds the pooler's optional C fast path; without a compiler pgpilot installs without it."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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


setup(
    ext_modules=[Extension("pgpilot.proxy._fastpath", ["src/pgpilot/proxy/_fastpath.c"],
                           extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
                           optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
