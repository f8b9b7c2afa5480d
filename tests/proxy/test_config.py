"""pgbouncer.ini / userlist.txt reading: defaults, units, precedence, errors with file:line."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import sys
from base64 import b64encode
from pathlib import Path

import pytest

from pgpilot.proxy.config import (
    DEFAULT_AUTH_QUERY,
    Config,
    ConfigError,
    DatabaseConfig,
    SecretKind,
    UserConfig,
    default_config,
    load_auth_file,
    load_config,
    parse_auth_file,
    parse_config,
    parse_scram_secret,
    secret_kind,
)

DATA = Path(__file__).parent / "data"
# auth_type=any needs no auth_file, so snippets below can focus on one thing.
HEAD = "[pgbouncer]\nauth_type = any\n"


def parse(body: str, path: str | None = "test.ini") -> Config:
    return parse_config(HEAD + body, path)


def error_of(body: str, path: str | None = "test.ini") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(body, path)
    return info.value


def scram_secret(password: str, salt: bytes = b"saltsaltsalt", iterations: int = 4096) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return (
        f"SCRAM-SHA-256${iterations}:{b64encode(salt).decode()}"
        f"${b64encode(stored_key).decode()}:{b64encode(server_key).decode()}"
    )


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------


def test_defaults_are_pgbouncers_documented_ones() -> None:
    config = default_config()
    assert config.path is None
    assert (config.listen_addr, config.listen_port, config.unix_socket_dir) == (
        "127.0.0.1",
        6432,
        "/tmp",
    )
    assert config.auth_type == "md5"
    assert config.auth_file is None
    assert config.auth_query == DEFAULT_AUTH_QUERY
    assert config.pool_mode == "session"
    assert config.max_client_conn == 100
    assert config.default_pool_size == 20
    assert config.min_pool_size == 0
    assert config.reserve_pool_size == 0
    assert config.reserve_pool_timeout == 5.0
    assert config.max_db_connections == 0
    assert config.max_user_connections == 0
    assert config.server_reset_query == "DISCARD ALL"
    assert config.server_reset_query_always is False
    assert config.server_check_query == "select 1"
    assert config.server_check_delay == 30.0
    assert config.server_lifetime == 3600.0
    assert config.server_idle_timeout == 600.0
    assert config.server_connect_timeout == 15.0
    assert config.server_login_retry == 15.0
    assert config.query_timeout == 0.0
    assert config.query_wait_timeout == 120.0
    assert config.client_idle_timeout == 0.0
    assert config.client_login_timeout == 60.0
    assert config.idle_transaction_timeout == 0.0
    assert config.ignore_startup_parameters == ()
    assert config.track_extra_parameters == ("IntervalStyle",)
    assert config.admin_users == () and config.stats_users == ()
    assert config.logfile is None and config.pidfile is None
    assert config.client_tls_sslmode == "disable"
    assert config.server_tls_sslmode == "prefer"
    assert config.max_prepared_statements == 200
    assert (config.metrics_port, config.workers, config.shutdown_timeout) == (0, 1, 30.0)
    assert config.tcp_keepalive is True
    assert config.tcp_defer_accept is sys.platform.startswith("linux")
    assert (config.pkt_buf, config.sbuf_loopcnt, config.listen_backlog) == (4096, 5, 128)
    assert config.stats_period == 60.0
    assert config.log_connections and config.log_disconnections and config.log_pooler_errors
    assert config.verbose == 0
    assert config.application_name_add_host is False
    assert dict(config.databases) == {} and dict(config.users) == {}
    assert config.warnings == ()


def test_a_file_without_settings_gets_the_same_defaults() -> None:
    parsed = parse_config("[pgbouncer]\nauth_type = any\n", "x.ini")
    assert dataclasses.replace(parsed, path=None) == default_config(auth_type="any")


def test_default_config_overrides_are_checked_and_frozen() -> None:
    config = default_config(
        pool_mode="transaction",
        listen_port=0,
        databases={"app": DatabaseConfig(name="app", port=5433)},
        admin_users=["root"],
    )
    assert config.pool_mode == "transaction"
    assert config.listen_port == 0
    assert config.databases["app"].port == 5433
    assert config.admin_users == ("root",)
    with pytest.raises(TypeError):
        config.databases["other"] = DatabaseConfig(name="other")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pool_mode = "session"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="pool_mode"):
        default_config(pool_mode="batch")
    with pytest.raises(ConfigError, match="default_pool_size"):
        default_config(default_pool_size=-1)
    with pytest.raises(ConfigError, match="no_such_setting"):
        default_config(no_such_setting=1)


# ---------------------------------------------------------------------------------------------
# The sample pgbouncer.ini
# ---------------------------------------------------------------------------------------------


def test_sample_pgbouncer_ini() -> None:
    config = load_config(DATA / "pgbouncer.ini")
    assert config.path == str(DATA / "pgbouncer.ini")
    assert config.listen_addr == "127.0.0.1, ::1"
    assert config.listen_addresses == ("127.0.0.1", "::1")
    assert config.listen_port == 6543
    assert config.auth_type == "scram-sha-256"
    assert config.auth_file == str(DATA / "userlist.txt")  # relative to the ini's directory
    assert set(config.auth_users) == {"admin", "alice", "bob", 'quo"ted'}
    assert config.admin_users == ("admin", "ops")
    assert config.stats_users == ("stats",)
    assert config.pool_mode == "transaction"
    assert config.default_pool_size == 25
    assert config.server_lifetime == 1800.5
    assert config.server_idle_timeout == 0.0
    assert config.ignore_startup_parameters == ("extra_float_digits", "options")
    assert config.max_client_conn == 500  # setting names are case-insensitive
    assert config.warnings == ()

    assert list(config.databases) == ["foodb", "bardb", "forcedb", 'odd "name"', "*", "included_db"]
    assert config.databases["foodb"] == DatabaseConfig(name="foodb")
    assert config.databases["foodb"].host is None and config.databases["foodb"].port == 5432
    bardb = config.databases["bardb"]
    assert (bardb.host, bardb.dbname, bardb.user) == ("localhost", "bazdb", None)
    forced = config.databases["forcedb"]
    assert (forced.host, forced.port, forced.user) == ("127.0.0.1", 5433, "baz")
    assert forced.password == "pa ss'wo\\rd"
    assert forced.connect_query == "SELECT 'hello'"
    assert (forced.client_encoding, forced.datestyle) == ("UNICODE", "ISO")
    assert (forced.pool_size, forced.reserve_pool, forced.max_db_connections) == (7, 2, 9)
    assert forced.pool_mode == "statement"
    assert config.databases['odd "name"'].host == "/var/run/postgresql"
    assert config.databases["included_db"].dbname == "inc"

    assert config.users["reporter"] == UserConfig(
        name="reporter", pool_mode="session", max_user_connections=3, pool_size=4
    )


# ---------------------------------------------------------------------------------------------
# Syntax
# ---------------------------------------------------------------------------------------------


def test_comment_lines_and_blank_lines() -> None:
    config = parse("; a comment\n   # indented comment\n\n\tdefault_pool_size = 3\n")
    assert config.default_pool_size == 3


def test_inline_comments_after_a_blank_end_the_value() -> None:
    config = parse(
        "pool_mode = transaction ; the usual\n"
        "listen_port = 7000\t# not 6432\n"
        "admin_users = alice, bob   ; two of them\n"
        "unix_socket_dir = ; no unix socket\n"
        "[databases]\n"
        "* = host=10.0.0.5   ; any other name: same name upstream\n"
        "app = host=db port=5433 # the app's\n"
        "empty = ; only a comment\n"
        "[users]\n"
        "u = pool_mode=session ;# session for u\n"
    )
    assert (config.pool_mode, config.listen_port) == ("transaction", 7000)
    assert config.admin_users == ("alice", "bob")
    assert config.unix_socket_dir == ""
    assert config.databases["*"] == DatabaseConfig(name="*", host="10.0.0.5")
    assert config.databases["app"] == DatabaseConfig(name="app", host="db", port=5433)
    assert config.databases["empty"] == DatabaseConfig(name="empty")
    assert config.users["u"].pool_mode == "session"
    assert config.warnings == ()


def test_inline_comment_characters_that_are_part_of_a_value() -> None:
    """Not a comment: ';'/'#' inside a word, inside a quoted connection-string value, and in
    the SQL settings, whose text is kept whole (';' separates statements), as PgBouncer."""
    config = parse(
        "server_reset_query = RESET ALL ; DISCARD ALL\n"
        "server_check_query = select 1 # 2\n"
        "auth_query = SELECT usename, passwd FROM pgb.lookup($1) ; \n"
        "[databases]\n"
        "a = password=se;cr#et user=x#y\n"
        "b = password='pass ;word # yes' connect_query='set a = 1 ; set b = 2'\n"
        "c = password= #hash\n"
    )
    assert config.server_reset_query == "RESET ALL ; DISCARD ALL"
    assert config.server_check_query == "select 1 # 2"
    assert config.auth_query == "SELECT usename, passwd FROM pgb.lookup($1) ;"
    assert (config.databases["a"].password, config.databases["a"].user) == ("se;cr#et", "x#y")
    assert config.databases["b"].password == "pass ;word # yes"
    assert config.databases["b"].connect_query == "set a = 1 ; set b = 2"
    # after '=' comes the value, whatever its first character (as PgBouncer)
    assert config.databases["c"].password == "#hash"


def test_inline_comment_on_an_include_line(tmp_path: Path) -> None:
    (tmp_path / "more.ini").write_text("[pgbouncer]\ndefault_pool_size = 9\n")
    main = tmp_path / "main.ini"
    main.write_text(HEAD + "%include more.ini   ; the pool sizes\n")
    assert load_config(main).default_pool_size == 9


def test_keys_and_sections_are_case_insensitive_and_later_lines_win() -> None:
    config = parse_config(
        "[PgBouncer]\nAUTH_TYPE = ANY\nPool_Mode = Transaction\npool_mode = statement\n"
    )
    assert config.auth_type == "any"
    assert config.pool_mode == "statement"


def test_pgpilot_is_an_alias_of_the_pgbouncer_section() -> None:
    assert parse_config("[pgpilot]\nauth_type = any\nworkers = 4\n").workers == 4


def test_syntax_errors_name_file_and_line() -> None:
    err = error_of("listen_port 6543\n")
    assert str(err) == "test.ini:3: syntax error: expected 'name = value'"
    err = error_of("[databases\n")
    assert (err.line, err.reason) == (3, "syntax error: section header without ']'")
    with pytest.raises(ConfigError) as info:
        parse_config("listen_port = 1\n[pgbouncer]\n", "x.ini")
    assert str(info.value) == "x.ini:1: setting 'listen_port' outside of any section"
    err = error_of("%unknown thing\n")
    assert err.line == 3 and "directive" in err.reason


def test_error_without_a_file_name() -> None:
    err = error_of("listen_port = x\n", path=None)
    assert str(err).startswith("<string>:3: invalid value for listen_port: 'x'")
    assert ConfigError("no line here", "a.ini").__str__() == "a.ini: no line here"
    assert str(ConfigError("bare")) == "bare"


def test_unknown_setting_is_a_warning_naming_it() -> None:
    config = parse("default_pool_size = 5\nfrobnicate = 7\nsyslog = 1\n", "conf/p.ini")
    assert config.default_pool_size == 5
    assert config.warnings == (
        "conf/p.ini:4: unknown setting 'frobnicate' ignored",
        "conf/p.ini:5: PgBouncer setting 'syslog' is not supported by pgpilot; ignored",
    )


def test_misspelled_names_get_a_did_you_mean() -> None:
    config = parse(
        "pool_mod = transaction\nfrobnicate = 1\ntcp_keepidl = 5\n"
        "[databses]\nx = 1\n"
        "[databases]\ndb = hots=h port=5432\n"
        "[users]\nu = pool_mod=session\n"
    )
    assert config.pool_mode == "session"  # the misspelled line is not taken
    assert config.warnings == (
        "test.ini:6: unknown section [databses] ignored; did you mean [databases]?",
        "test.ini:3: unknown setting 'pool_mod' ignored; did you mean pool_mode?",
        "test.ini:4: unknown setting 'frobnicate' ignored",
        "test.ini:5: unknown setting 'tcp_keepidl' ignored; did you mean tcp_keepidle?",
        "test.ini:9: database 'db': unknown parameter 'hots' ignored; did you mean host?",
        "test.ini:11: user 'u': unknown parameter 'pool_mod' ignored; did you mean pool_mode?",
    )
    assert config.unknown_settings == config.warnings


def test_unknown_settings_leave_out_what_pgpilot_knows_but_does_not_support() -> None:
    config = parse("syslog = 1\n[peers]\n1 = host=p\n[databases]\n"
                   "db = host=h target_session_attrs=any\n")
    assert len(config.warnings) == 2
    assert config.unknown_settings == ()


def test_unknown_sections_are_warnings_and_peers_is_read() -> None:
    config = parse("[mystery]\nx = 1\n[peers]\n1 = host=/tmp/p1 colour=blue\n")
    assert config.warnings == (
        "test.ini:3: unknown section [mystery] ignored",
        "test.ini:6: peer '1': unknown parameter 'colour' ignored",
    )
    assert config.peers[1].host == "/tmp/p1"


def test_utf8_error_names_the_line(tmp_path: Path) -> None:
    ini = tmp_path / "bad.ini"
    ini.write_bytes(b"[pgbouncer]\nauth_type = any\nlogfile = \xff.log\n")
    with pytest.raises(ConfigError) as info:
        load_config(ini)
    assert (info.value.path, info.value.line) == (str(ini), 3)


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: config file not found"


# ---------------------------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600.0), ("0.5", 0.5), ("1e2", 100.0), (".25", 0.25), ("0", 0.0)],
)
def test_time_settings_are_seconds_with_fractions(text: str, seconds: float) -> None:
    assert parse(f"server_lifetime = {text}\n").server_lifetime == seconds


@pytest.mark.parametrize("text", ["10s", "5min", "-1", "abc", "", "nan", "inf"])
def test_time_settings_reject_units_and_negatives_like_pgbouncer(text: str) -> None:
    err = error_of(f"query_wait_timeout = {text}\n")
    assert err.line == 3
    assert err.reason.startswith(f"invalid value for query_wait_timeout: {text!r}")
    assert "seconds" in err.reason


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("yes", True),
        ("On", True),
        ("TRUE", True),
        ("0", False),
        ("no", False),
        ("off", False),
        ("False", False),
    ],
)
def test_booleans(text: str, value: bool) -> None:
    assert parse(f"server_reset_query_always = {text}\n").server_reset_query_always is value


def test_bad_boolean() -> None:
    err = error_of("log_connections = maybe\n")
    assert err.line == 3 and "log_connections" in err.reason and "boolean" in err.reason


@pytest.mark.parametrize(("text", "value"), [("1", True), ("45", True), ("0", False),
                                             ("on", True), ("off", False)])
def test_tcp_defer_accept_reads_as_pgbouncer_does(text: str, value: bool) -> None:
    """PgBouncer reads it as a number (any but 0 is on; it sets 45 s): both spellings work."""
    assert parse(f"tcp_defer_accept = {text}\n").tcp_defer_accept is value


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("tcp_defer_accept = soon", "number of seconds"),
        ("tcp_defer_accept = \u00b2", "number of seconds"),
        ("default_pool_size = ten", "non-negative integer"),
        ("default_pool_size = 2.5", "non-negative integer"),
        ("max_client_conn = -5", "non-negative integer"),
        ("listen_port = 70000", "from 0 to 65535"),
        ("workers = 0", ">= 1"),
        ("pool_mode = batch", "session, transaction, statement"),
        ("auth_type = kerberos", "scram-sha-256, md5"),
        ("client_tls_sslmode = maybe", "disable, allow"),
        ("server_tls_sslmode = always", "verify-full"),
        ("unix_socket_mode = 999", "octal"),
    ],
)
def test_invalid_values_name_file_line_and_reason(line: str, fragment: str) -> None:
    err = error_of(f"\n{line}\n")
    assert (err.path, err.line) == ("test.ini", 4)
    name = line.split()[0]
    assert err.reason.startswith(f"invalid value for {name}:")
    assert fragment in err.reason
    assert str(err) == f"test.ini:4: {err.reason}"


def test_enumerations_are_case_insensitive() -> None:
    config = parse("pool_mode = Transaction\nserver_tls_sslmode = VERIFY-FULL\n")
    assert (config.pool_mode, config.server_tls_sslmode) == ("transaction", "verify-full")


def test_accepted_auth_types_include_those_the_runtime_may_refuse() -> None:
    for auth_type in ("any", "cert"):
        assert parse_config(f"[pgbouncer]\nauth_type={auth_type}\n").auth_type == auth_type


def test_pam_and_ldap_are_refused_naming_the_setting() -> None:
    # Accepting them and logging nobody in (or everybody) would be silent: the file is refused.
    for auth_type in ("pam", "ldap"):
        with pytest.raises(ConfigError) as err:
            parse_config(f"[pgbouncer]\nauth_type = {auth_type}\n", "p.ini")
        assert str(err.value).startswith("p.ini:2: auth_type = " + auth_type)
        assert "not supported by pgpilot" in err.value.reason


def test_lists_and_strings() -> None:
    config = parse(
        "admin_users = a , b,,c\nserver_reset_query = DEALLOCATE ALL\n"
        "server_check_query =\nlisten_addr = *\nunix_socket_dir =\n"
    )
    assert config.admin_users == ("a", "b", "c")
    assert config.server_reset_query == "DEALLOCATE ALL"
    assert config.server_check_query == ""  # disables the check
    assert config.listen_addresses == ("*",)
    assert config.unix_socket_dir == ""


def test_empty_listen_addr_means_no_tcp() -> None:
    assert parse("listen_addr =\n").listen_addresses == ()


# ---------------------------------------------------------------------------------------------
# %include
# ---------------------------------------------------------------------------------------------


def test_include_is_relative_to_the_including_file_and_keeps_the_section(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "dbs.ini").write_text(
        "extra = host=h2\n[pgbouncer]\npool_mode = statement\n"
    )
    (tmp_path / "main.ini").write_text(
        "[pgbouncer]\nauth_type = any\n[databases]\nfirst = host=h1\n"
        "%include sub/dbs.ini\nmax_client_conn = 7\n"
    )
    config = load_config(tmp_path / "main.ini")
    assert list(config.databases) == ["first", "extra"]
    assert config.pool_mode == "statement"
    assert config.max_client_conn == 7  # the included file left us in [pgbouncer]


def test_include_errors_name_the_included_file_and_its_line(tmp_path: Path) -> None:
    (tmp_path / "inc.ini").write_text("; comment\ndefault_pool_size = lots\n")
    (tmp_path / "main.ini").write_text("[pgbouncer]\nauth_type = any\n%include inc.ini\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "main.ini")
    assert (info.value.path, info.value.line) == (str(tmp_path / "inc.ini"), 2)


def test_missing_include_points_at_the_include_line(tmp_path: Path) -> None:
    (tmp_path / "main.ini").write_text("[pgbouncer]\nauth_type = any\n\n%include gone.ini\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "main.ini")
    assert (info.value.path, info.value.line) == (str(tmp_path / "main.ini"), 4)
    assert "gone.ini" in info.value.reason and "not found" in info.value.reason


def test_include_cycle_stops(tmp_path: Path) -> None:
    (tmp_path / "loop.ini").write_text("[pgbouncer]\nauth_type = any\n%include loop.ini\n")
    with pytest.raises(ConfigError, match="nested more than 10"):
        load_config(tmp_path / "loop.ini")


def test_include_falls_back_to_the_working_directory_like_pgbouncer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "cwd_only.ini").write_text("workers = 3\n")
    (tmp_path / "conf" / "main.ini").write_text(
        "[pgbouncer]\nauth_type = any\n%include cwd_only.ini\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "conf" / "main.ini").workers == 3


# ---------------------------------------------------------------------------------------------
# [databases] connection strings
# ---------------------------------------------------------------------------------------------


def test_connstring_quoting_spacing_and_case() -> None:
    config = parse(
        "[databases]\n"
        "a = host = h1   PORT=6000 dbname='my db' application_name='x''y' timezone=UTC\n"
        "b = host=h dbname=d\\e connect_query='SET a = 1; SELECT 2'\n"
        "'quoted name' = auth_user=au min_pool_size=1 server_lifetime=12.5\n"
    )
    a = config.databases["a"]
    assert (a.host, a.port, a.dbname, a.application_name, a.timezone) == (
        "h1",
        6000,
        "my db",
        "x'y",
        "UTC",
    )
    b = config.databases["b"]
    assert b.dbname == "d\\e"  # a backslash is an ordinary character, as in PgBouncer
    assert b.connect_query == "SET a = 1; SELECT 2"
    quoted = config.databases["quoted name"]
    assert (quoted.auth_user, quoted.min_pool_size, quoted.server_lifetime) == ("au", 1, 12.5)


def test_reserve_pool_size_is_an_alias_of_reserve_pool() -> None:
    config = parse("[databases]\na = reserve_pool_size=3\nb = reserve_pool=4\n")
    assert (config.databases["a"].reserve_pool, config.databases["b"].reserve_pool) == (3, 4)


@pytest.mark.parametrize(
    ("connstring", "fragment"),
    [
        ("host=h port=abc", "invalid value for port: 'abc'"),
        ("port=0", "invalid value for port: '0'"),
        ("pool_size=-2", "invalid value for pool_size: '-2'"),
        ("pool_size=big", "invalid value for pool_size"),
        ("pool_mode=sometimes", "invalid value for pool_mode"),
        ("max_db_connections=1.5", "invalid value for max_db_connections"),
        ("host=h dbname", "expected key=value after 'host'"),
        ("=x", "expected key=value"),
        ("application_name='never closed", "unterminated quote in 'application_name'"),
        ("dbname='a'b", "text right after the quoted value of 'dbname'"),
        ("dbname=''", "empty value for 'dbname'"),
    ],
)
def test_bad_connstrings_name_database_file_and_line(connstring: str, fragment: str) -> None:
    err = error_of(f"[databases]\nok = host=h\nbroken = {connstring}\n")
    assert (err.path, err.line) == ("test.ini", 5)
    assert err.reason.startswith("database 'broken': ")
    assert fragment in err.reason


def test_passwords_never_appear_in_errors_warnings_or_repr() -> None:
    secret = "S3cr3t-Pa55"
    for connstring in (
        f"password='{secret}",  # unterminated quote
        f"password={secret} port=nope",
        f"password={secret} pool_size=x",
    ):
        err = error_of(f"[databases]\ndb = {connstring}\n")
        assert secret not in str(err)
    config = parse(f"[databases]\ndb = user=u password={secret} sslmode=require\n")
    assert config.databases["db"].password == secret
    assert secret not in repr(config) and secret not in repr(config.databases["db"])
    assert all(secret not in warning for warning in config.warnings)
    assert config.warnings == ("test.ini:4: database 'db': unknown parameter 'sslmode' ignored",)


def test_unsupported_pgbouncer_connstring_parameter_is_a_warning() -> None:
    config = parse("[databases]\ndb = host=h target_session_attrs=read-write\n")
    assert config.databases["db"].host == "h"
    assert config.warnings == (
        "test.ini:4: database 'db': parameter 'target_session_attrs' is not supported "
        "by pgpilot; ignored",
    )


@pytest.mark.parametrize("name", ["pgbouncer", "pgpilot", "PgBouncer"])
def test_admin_console_names_are_reserved(name: str) -> None:
    err = error_of(f"[databases]\n{name} = host=h\n")
    assert err.line == 4 and "reserved" in err.reason


def test_double_quoted_database_names() -> None:
    config = parse('[databases]\n"my-db.1" = host=h\n"a""b" = host=i\n')
    assert list(config.databases) == ["my-db.1", 'a"b']
    assert error_of('[databases]\n"open = host=h\n').line == 4


# ---------------------------------------------------------------------------------------------
# Lookups: "*" fallback and precedence
# ---------------------------------------------------------------------------------------------


def test_database_for_exact_then_fallback_then_none() -> None:
    config = parse("[databases]\napp = host=h dbname=real\n* = host=fallback port=6000\n")
    exact = config.database_for("app")
    assert exact is not None and exact.dbname == "real" and not exact.is_fallback
    assert exact.server_dbname("app") == "real"
    auto = config.database_for("other")
    assert auto is not None
    assert (auto.name, auto.host, auto.port, auto.dbname, auto.is_fallback) == (
        "other",
        "fallback",
        6000,
        None,
        True,
    )
    assert auto.server_dbname("other") == "other"  # the client's database name is used
    assert config.database_for("pgbouncer") is None  # the console is never a fallback
    assert parse("[databases]\napp = host=h\n").database_for("other") is None


def test_database_user_forcing() -> None:
    config = parse("[databases]\nforced = user=svc\nfree = host=h\n")
    assert config.databases["forced"].server_user("alice") == "svc"
    assert config.databases["free"].server_user("alice") == "alice"


def test_pool_mode_precedence_user_then_database_then_global() -> None:
    config = parse(
        "pool_mode = transaction\n"
        "[databases]\nsess = pool_mode=session\nplain = host=h\n"
        "[users]\nstmt = pool_mode=statement\nnothing = max_user_connections=2\n"
    )
    sess, plain = config.databases["sess"], config.databases["plain"]
    assert config.pool_mode_for(plain, "someone") == "transaction"
    assert config.pool_mode_for(sess, "someone") == "session"
    assert config.pool_mode_for(sess, "stmt") == "statement"
    assert config.pool_mode_for(plain, "nothing") == "transaction"


def test_pool_size_precedence() -> None:
    config = parse(
        "default_pool_size = 11\nreserve_pool_size = 1\nmin_pool_size = 4\n"
        "[databases]\nsized = pool_size=3 reserve_pool=2\nplain = min_pool_size=50\n"
        "[users]\nbig = pool_size=30 reserve_pool_size=5\n"
    )
    sized, plain = config.databases["sized"], config.databases["plain"]
    assert config.pool_size_for(plain) == 11
    assert config.pool_size_for(sized) == 3
    assert config.pool_size_for(sized, "big") == 30
    assert config.pool_size_for(sized, "nobody") == 3
    assert config.reserve_pool_size_for(plain) == 1
    assert config.reserve_pool_size_for(sized) == 2
    assert config.reserve_pool_size_for(sized, "big") == 5
    assert config.min_pool_size_for(sized) == 3  # global 4 capped at the pool size 3
    assert config.min_pool_size_for(plain) == 11  # 50 capped at default_pool_size


def test_connection_limits_precedence() -> None:
    config = parse(
        "max_db_connections = 40\nmax_user_connections = 8\nserver_lifetime = 100\n"
        "[databases]\nlimited = max_db_connections=5 server_lifetime=7\nplain = host=h\n"
        "[users]\ncapped = max_user_connections=2\n"
    )
    limited, plain = config.databases["limited"], config.databases["plain"]
    assert config.max_db_connections_for(limited) == 5
    assert config.max_db_connections_for(plain) == 40
    assert config.max_user_connections_for("capped") == 2
    assert config.max_user_connections_for("other") == 8
    assert config.server_lifetime_for(limited) == 7.0
    assert config.server_lifetime_for(plain) == 100.0


def test_users_section_values_and_errors() -> None:
    config = parse("[users]\nu = pool_mode=Transaction client_idle_timeout=2.5 query_timeout=9\n")
    assert config.users["u"] == UserConfig(
        name="u", pool_mode="transaction", client_idle_timeout=2.5, query_timeout=9.0
    )
    err = error_of("[users]\nu = max_user_connections=many\n")
    assert err.line == 4
    assert err.reason.startswith("user 'u': invalid value for max_user_connections: 'many'")
    warned = parse("[users]\nu = colour=blue\n")
    assert warned.warnings == ("test.ini:4: user 'u': unknown parameter 'colour' ignored",)


# ---------------------------------------------------------------------------------------------
# auth_file in the config
# ---------------------------------------------------------------------------------------------


def test_auth_types_needing_auth_file_fail_without_one() -> None:
    for auth_type in ("md5", "scram-sha-256", "plain", "trust"):
        with pytest.raises(ConfigError) as info:
            parse_config(f"[pgbouncer]\nlisten_port = 1\nauth_type = {auth_type}\n", "a.ini")
        assert str(info.value) == (
            f"a.ini:3: auth_type = {auth_type} needs auth_file (or auth_user for auth_query)"
        )
    # the default auth_type (md5) also needs one; there is no auth_type line to point at
    with pytest.raises(ConfigError) as info:
        parse_config("[pgbouncer]\n", "a.ini")
    assert (info.value.path, info.value.line) == ("a.ini", None)
    # auth_user (auth_query) is enough
    assert parse_config("[pgbouncer]\nauth_user = pgpilot\n").auth_user == "pgpilot"


def test_missing_auth_file_fails_at_its_line(tmp_path: Path) -> None:
    ini = tmp_path / "p.ini"
    ini.write_text("[pgbouncer]\nauth_type = md5\nauth_file = missing.txt\n")
    with pytest.raises(ConfigError) as info:
        load_config(ini)
    assert (info.value.path, info.value.line) == (str(ini), 3)
    assert str(tmp_path / "missing.txt") in info.value.reason


def test_auth_file_is_loaded_and_checked_with_the_config(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text('"u" "p"\n"broken\n')
    ini = tmp_path / "p.ini"
    ini.write_text("[pgbouncer]\nauth_file = users.txt\n")
    with pytest.raises(ConfigError) as info:
        load_config(ini)
    assert (info.value.path, info.value.line) == (str(tmp_path / "users.txt"), 2)
    (tmp_path / "users.txt").write_text('"u" "p"\n')
    config = load_config(ini)
    assert dict(config.auth_users) == {"u": "p"}
    assert "auth_users" not in repr(config)


def test_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "users.txt").write_text("")
    ini = tmp_path / "p.ini"
    ini.write_text(
        "[pgbouncer]\nauth_file = users.txt\nlogfile = log/pgpilot.log\npidfile = /run/p.pid\n"
    )
    config = load_config(ini)
    assert config.auth_file == str(tmp_path / "users.txt")
    assert config.logfile == str(tmp_path / "log" / "pgpilot.log")
    assert config.pidfile == "/run/p.pid"


def test_client_tls_needs_key_and_cert(tmp_path: Path) -> None:
    err = error_of("client_tls_sslmode = require\n")
    assert err.line == 3 and "needs client_tls_key_file" in err.reason
    (tmp_path / "server.key").write_text("k")
    ini = tmp_path / "p.ini"
    ini.write_text(
        "[pgbouncer]\nauth_type = any\nclient_tls_sslmode = require\n"
        "client_tls_key_file = server.key\nclient_tls_cert_file = server.crt\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(ini)
    assert (
        info.value.line == 5
        and "server.crt" in info.value.reason
        and "not found" in str(info.value)
    )
    (tmp_path / "server.crt").write_text("c")
    config = load_config(ini)
    assert config.client_tls_cert_file == str(tmp_path / "server.crt")


# ---------------------------------------------------------------------------------------------
# userlist.txt
# ---------------------------------------------------------------------------------------------


def test_sample_userlist_formats() -> None:
    users = load_auth_file(DATA / "userlist.txt")
    assert users == {
        "admin": "md545f2603610af569b6155c45067268c6b",
        "alice": "plain secret",
        "bob": "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$"
        "nQpbZ77WudtqufPwikHXGRt6g2QJ4zns8bZLw273DRM=:jn2amWP1q1h+jgjy0YTO14S6/F02SV7taipOeB7ef20=",
        'quo"ted': 'has "quotes"',
    }
    assert secret_kind(users["admin"]) is SecretKind.MD5
    assert secret_kind(users["alice"]) is SecretKind.PLAIN
    assert secret_kind(users["bob"]) is SecretKind.SCRAM_SHA_256
    # the docs' example: user admin, password 1234 -> md5(password + user)
    assert users["admin"] == "md5" + hashlib.md5(b"1234admin").hexdigest()


def test_secret_kinds_by_shape() -> None:
    assert secret_kind("md5" + "a" * 32) is SecretKind.MD5
    assert secret_kind("md5" + "a" * 31) is SecretKind.PLAIN  # too short: a password
    assert secret_kind("md5" + "g" * 32) is SecretKind.PLAIN  # not hex: a password
    assert secret_kind("") is SecretKind.PLAIN


def test_scram_secret_decodes_to_what_a_login_check_needs() -> None:
    secret = scram_secret("pencil", salt=b"NaCl" * 4, iterations=4096)
    decoded = parse_scram_secret(secret)
    assert decoded.iterations == 4096
    assert decoded.salt == b"NaCl" * 4
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", decoded.salt, decoded.iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert hashlib.sha256(client_key).digest() == decoded.stored_key
    assert hmac.new(salted, b"Server Key", hashlib.sha256).digest() == decoded.server_key
    assert "NaCl" not in repr(decoded)


@pytest.mark.parametrize(
    "secret",
    [
        "SCRAM-SHA-256$4096:c2FsdA==$short:keys",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==",
        "SCRAM-SHA-256$4096:!!!$" + "A" * 43 + "=:" + "A" * 43 + "=",
    ],
)
def test_malformed_scram_secret_in_userlist_fails_with_line_without_the_secret(
    secret: str,
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_auth_file(f'"ok" "x"\n"carol" "{secret}"\n', "userlist.txt")
    assert (info.value.path, info.value.line) == ("userlist.txt", 2)
    assert 'user "carol": malformed SCRAM secret' in info.value.reason
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    "line",
    ["alice secret", '"alice" secret', '"alice"', '"alice" "unterminated', '"" "x"', "'a' 'b'"],
)
def test_malformed_userlist_lines(line: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_auth_file(f'; header\n"good" "pw"\n{line}\n', "u.txt")
    assert (info.value.path, info.value.line) == ("u.txt", 3)
    assert "secret" not in str(info.value).replace("expected", "")


def test_userlist_comments_blank_lines_and_duplicates() -> None:
    users = parse_auth_file('\n; semi\n# hash\n  "a" "1"\n"a"\t"2" trailing\n')
    assert users == {"a": "2"}  # the later line wins, the rest of a line is ignored


def test_missing_auth_file_function(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_auth_file(tmp_path / "none.txt")
    assert info.value.line is None and "not found" in info.value.reason
