"""The manual (docs/*.md) and the README say only what is true.

- Every fenced ``python`` block runs, in a fresh namespace, against a scratch database of the
  test PostgreSQL holding the example tables (the ``sql`` block marked ``<!-- docs-setup -->``,
  run again before each block), with ``PGPILOT_DSN`` pointing at it. A block preceded by
  ``<!-- not-run: reason -->`` is skipped; one preceded by ``<!-- run: pooler -->`` runs with a
  real ``pgpilot proxy`` in front of that PostgreSQL, its address in place of 127.0.0.1:6432.
- Every ``ini`` block is a pgbouncer.ini that ``load_config`` (what ``pgpilot proxy --check``
  runs) accepts without an error or a warning; the files it names come from blocks of the same
  page with that title (``title="userlist.txt"``, itself a valid auth file), else are empty.
- The configuration reference lists exactly the settings config.py accepts, with its defaults.
- The README's results table quotes its result files to the digits it shows.

The conventions are described for contributors in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgpilot.embedded import free_port
from pgpilot.proxy import config as config_module
from pgpilot.proxy.config import load_config, parse_auth_file

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
REFERENCE = DOCS / "configuration.md"

FENCE = re.compile(r"^(?P<fence>`{3,})\s*(?P<lang>[\w+-]*)(?P<attrs>[^`]*)$")
MARKER = re.compile(r"^<!--\s*(?P<text>.*?)\s*-->$")
TITLE = re.compile(r'title="(?P<title>[^"]+)"')


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    title: str | None
    marker: str | None  # the HTML comment on the line before the fence, if any
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` (top level and indented alike), in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        stripped = lines[index].strip()
        match = FENCE.match(stripped)
        if match is None:
            index += 1
            continue
        indent = len(lines[index]) - len(lines[index].lstrip())
        fence = match["fence"]
        previous = lines[index - 1].strip() if index > 0 else ""
        marker = MARKER.match(previous)
        title = TITLE.search(match["attrs"])
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and lines[end].strip().strip("`") == ""
        ):
            body.append(lines[end][indent:])
            end += 1
        assert end < len(lines), f"{path}:{index + 1}: code block is never closed"
        blocks.append(Block(path, index + 1, match["lang"].lower(),
                            title["title"] if title else None,
                            marker["text"] if marker else None, "\n".join(body) + "\n"))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in read_blocks(page)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]
INI_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "ini"]


def marker_kind(block: Block) -> str:
    """``run``, ``pooler`` or ``not-run``; fails on a marker this test does not know."""
    if block.marker is None or block.marker == "docs-setup":
        return "run"
    if block.marker == "run: pooler":
        return "pooler"
    if block.marker.startswith("not-run:") and block.marker[len("not-run:"):].strip():
        return "not-run"
    raise AssertionError(f"{block.where}: unknown marker <!-- {block.marker} --> (use "
                         "'not-run: <reason>' or 'run: pooler')")


def setup_sql() -> str:
    found = [b for b in ALL_BLOCKS if b.marker == "docs-setup"]
    assert len(found) == 1, "exactly one block must be marked <!-- docs-setup -->"
    assert found[0].lang == "sql", f"{found[0].where}: the setup block must be sql"
    return found[0].code


# ------------------------------------------------------------------------------------------
# The scratch database and the pooler the samples run against
# ------------------------------------------------------------------------------------------


def dsn_url(info: dict[str, Any], dbname: str) -> str:
    """A postgresql:// URL (what asyncpg, psycopg and SQLAlchemy all read) for ``dbname``."""
    user = quote(str(info.get("user") or os.environ.get("USER", "postgres")), safe="")
    password = info.get("password")
    auth = f"{user}:{quote(str(password), safe='')}" if password else user
    host = str(info.get("host") or "127.0.0.1")
    port = str(info.get("port") or "5432")
    return f"postgresql://{auth}@{host}:{port}/{dbname}"


@pytest.fixture(scope="module")
def docs_dsn(pg_dsn: str) -> Iterator[str]:
    """A database of its own (this process's), for the example tables."""
    name = f"pgpilot_docs_{os.getpid()}"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield dsn_url(conninfo_to_dict(pg_dsn), name)
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"pgpilot proxy exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"pgpilot proxy did not listen on {port} within {timeout} s")


@pytest.fixture(scope="module")
def docs_pooler(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real ``pgpilot proxy`` in front of the test PostgreSQL; yields its port."""
    info = conninfo_to_dict(pg_dsn)
    entry = f"host={info.get('host') or '127.0.0.1'} port={info.get('port') or 5432}"
    if info.get("user"):
        entry += f" user={info['user']}"
    if info.get("password"):
        entry += f" password='{str(info['password']).replace(chr(39), chr(39) * 2)}'"
    port = free_port()
    folder = tmp_path_factory.mktemp("docs-pooler")
    ini = folder / "pgbouncer.ini"
    ini.write_text(f"[databases]\n* = {entry}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
                   f"listen_port = {port}\nunix_socket_dir =\nauth_type = any\n"
                   "pool_mode = transaction\nadmin_users = postgres\n")
    log = (folder / "proxy.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "pgpilot", "proxy", "--config", str(ini),
                                "-q"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# ------------------------------------------------------------------------------------------
# Python samples run
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_sample_runs(block: Block, request: pytest.FixtureRequest,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    kind = marker_kind(block)
    if kind == "not-run":
        pytest.skip(f"marked {block.marker}")
    code = block.code
    if kind == "pooler":
        port = request.getfixturevalue("docs_pooler")
        assert "127.0.0.1:6432" in code, f"{block.where}: a pooler sample dials 127.0.0.1:6432"
        code = code.replace("127.0.0.1:6432", f"127.0.0.1:{port}")
    dsn = request.getfixturevalue("docs_dsn")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(setup_sql().encode())
    monkeypatch.setenv("PGPILOT_DSN", dsn)
    # A module of its own, registered while it runs: SQLAlchemy reads mapped classes'
    # annotations through sys.modules[cls.__module__].
    name = f"docs_sample_{block.path.stem.replace('-', '_')}_{block.line}"
    module = types.ModuleType(name)
    module.__file__ = str(block.path)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(code, block.where, "exec"), module.__dict__)


def test_every_page_has_its_samples_marked() -> None:
    """Markers are ones this test knows, and a not-run marker names its reason."""
    for block in ALL_BLOCKS:
        if block.lang in ("python", "py", "ini"):
            marker_kind(block)


# ------------------------------------------------------------------------------------------
# pgbouncer.ini samples pass --check
# ------------------------------------------------------------------------------------------

FILE_SETTING = re.compile(r"^\s*(?P<key>\w+_file)\s*=\s*(?P<value>[^\s;#]+)", re.MULTILINE)


@pytest.mark.parametrize("block", INI_BLOCKS, ids=[b.where for b in INI_BLOCKS])
def test_ini_sample_passes_check(block: Block, tmp_path: Path) -> None:
    if marker_kind(block) == "not-run":
        pytest.skip(f"marked {block.marker}")
    titled = {b.title: b for b in read_blocks(block.path) if b.title and b is not block}
    for match in FILE_SETTING.finditer(block.code):
        target = tmp_path / match["value"]
        source = titled.get(match["value"])
        if source is not None:
            target.write_text(source.code)
            if match["key"] == "auth_file":
                assert parse_auth_file(source.code, str(target)), f"{source.where}: no users"
        else:
            target.touch()
    path = tmp_path / (block.title or "pgbouncer.ini")
    path.write_text(block.code)
    config = load_config(path)
    assert config.warnings == (), f"{block.where}: {config.warnings}"


def test_check_command_accepts_the_readme_sample(tmp_path: Path) -> None:
    """The first pgbouncer.ini of the README, through the real command line."""
    readme = [b for b in INI_BLOCKS if b.path.name == "README.md"]
    assert readme, "the README shows a pgbouncer.ini"
    block = readme[0]
    titled = {b.title: b for b in read_blocks(block.path) if b.title}
    for match in FILE_SETTING.finditer(block.code):
        source = titled.get(match["value"])
        (tmp_path / match["value"]).write_text(source.code if source else "")
    path = tmp_path / "pgbouncer.ini"
    path.write_text(block.code)
    done = subprocess.run([sys.executable, "-m", "pgpilot", "proxy", "--check", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{shlex.join(done.args)}: {done.stderr}"
    assert "configuration is valid" in done.stdout


# ------------------------------------------------------------------------------------------
# The configuration reference and config.py agree
# ------------------------------------------------------------------------------------------

CODE_SPAN = re.compile(r"`([^`]+)`")


def reference_tables() -> dict[tuple[str, str], list[tuple[list[str], str]]]:
    """(h2, h3) -> rows of the tables under it: (names in the first column, second column)."""
    tables: dict[tuple[str, str], list[tuple[list[str], str]]] = {}
    h2 = h3 = ""
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            h2, h3 = line[3:].strip(), ""
        elif line.startswith("### "):
            h3 = line[4:].strip()
        elif line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            names = CODE_SPAN.findall(cells[0])
            if names:  # the header row has none
                tables.setdefault((h2, h3), []).append((names, cells[1] if len(cells) > 1 else ""))
    return tables


def names_under(h2: str, h3: str | None = None) -> list[str]:
    found = [name for (a, b), rows in reference_tables().items()
             if a == h2 and (h3 is None or b == h3) for names, _ in rows for name in names]
    assert found, f"the reference has no table under '{h2}' / '{h3}'"
    return found


def assert_same(documented: list[str], accepted: set[str] | frozenset[str], what: str) -> None:
    duplicates = sorted({n for n in documented if documented.count(n) > 1})
    assert not duplicates, f"{what}: listed twice in docs/configuration.md: {duplicates}"
    missing = sorted(set(accepted) - set(documented))
    extra = sorted(set(documented) - set(accepted))
    assert not missing, f"{what}: accepted by config.py, missing from the reference: {missing}"
    assert not extra, f"{what}: in the reference, not accepted by config.py: {extra}"


def test_reference_lists_every_pgbouncer_setting() -> None:
    assert_same(names_under("[pgbouncer] settings"), set(config_module._SETTINGS),
                "[pgbouncer] settings")


def test_reference_lists_every_database_user_and_peer_key() -> None:
    assert_same(names_under("[databases] entries"), set(config_module._DATABASE_KEYS),
                "[databases] keys")
    assert_same(names_under("[users] entries"), set(config_module._USER_KEYS), "[users] keys")
    assert_same(names_under("[peers] entries"), set(config_module._PEER_KEYS), "[peers] keys")


def test_reference_lists_the_pgbouncer_names_pgpilot_ignores() -> None:
    section = "Accepted and ignored"
    assert_same(names_under(section, "In [pgbouncer]"),
                config_module._PGBOUNCER_SETTINGS_NOT_SUPPORTED, "ignored [pgbouncer] settings")
    assert_same(names_under(section, "In [databases]"),
                config_module._DATABASE_KEYS_NOT_SUPPORTED, "ignored [databases] keys")
    assert_same(names_under(section, "In [users]"), config_module._USER_KEYS_NOT_SUPPORTED,
                "ignored [users] keys")


# Defaults that depend on the platform: the reference gives the Linux one.
PLATFORM_DEFAULTS: dict[str, object] = {"tcp_defer_accept": True}


def test_reference_defaults_are_the_codes() -> None:
    """Each default, read with the setting's own converter, is Config's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_module.Config)}
    rows = [row for (h2, _), table in reference_tables().items() if h2 == "[pgbouncer] settings"
            for row in table]
    wrong: list[str] = []
    for names, default_cell in rows:
        for name in names:
            spans = CODE_SPAN.findall(default_cell)
            text = spans[0] if spans else ""
            converted = config_module._SETTINGS[name].convert(text)
            expected = PLATFORM_DEFAULTS.get(name, defaults[name])
            if converted != expected:
                wrong.append(f"{name}: documented {text!r}, code {expected!r}")
    assert not wrong, "defaults in docs/configuration.md differ from config.py: " + "; ".join(wrong)


# ------------------------------------------------------------------------------------------
# The README's results table quotes its result files
# ------------------------------------------------------------------------------------------

INTERVAL = re.compile(r"\d+\.\d+x \[\d+\.\d+-\d+\.\d+\]")
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")


def numbers_in(text: str) -> list[str]:
    return [n.replace(",", "") for n in NUMBER.findall(text)]


def rounds_to(shown: str, candidates: set[str]) -> bool:
    """Is ``shown`` one of ``candidates`` rounded (half up) to the digits ``shown`` has?"""
    places = len(shown.split(".")[1]) if "." in shown else 0
    quantum = Decimal(1).scaleb(-places)
    for candidate in candidates:
        try:
            if Decimal(candidate).quantize(quantum, rounding=ROUND_HALF_UP) == Decimal(shown):
                return True
        except InvalidOperation:
            continue
    return False


def readme_results_rows() -> list[tuple[str, str, Path]]:
    """(what, result, result file) for each row of the README's results table: the figures
    are in the second column, the file in the last."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Results")
    end = text.find("\n## ", start + 1)
    rows: list[tuple[str, str, Path]] = []
    for line in text[start:end if end > 0 else None].splitlines():
        if not line.startswith("|") or re.match(r"^\|[\s|:-]+\|$", line):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        files = re.findall(r"bench/results/[\w.-]+\.md", cells[-1])
        if files:
            rows.append((cells[0], cells[1], ROOT / files[0]))
    return rows


def test_readme_results_match_their_files() -> None:
    rows = readme_results_rows()
    assert len(rows) >= 3, "the README has a results table citing bench/results files"
    wrong: list[str] = []
    for what, figures, source in rows:
        assert source.is_file(), f"README results row '{what}' cites {source}, which is gone"
        text = source.read_text(encoding="utf-8")
        # A ratio with its interval is quoted whole: "1.46x [1.42-1.49]".
        for phrase in INTERVAL.findall(figures):
            if phrase not in text:
                wrong.append(f"'{what}': '{phrase}' is not in {source.relative_to(ROOT)}")
        available = set(numbers_in(text))
        for shown in numbers_in(figures):
            if not rounds_to(shown, available):
                wrong.append(f"'{what}': {shown} is not in {source.relative_to(ROOT)}")
    assert not wrong, "; ".join(wrong)


def test_pgbouncer_compatibility_page_is_generated_from_the_code() -> None:
    """docs/pgbouncer-compat.md is what tools/pgbouncer_table.py makes of PgBouncer's names
    and pgpilot's own tables: a setting, command or SHOW column changed in the code without
    regenerating the page fails here."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "tools" / "pgbouncer_table.py"),
                           "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
