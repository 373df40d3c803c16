"""Hostile values from the command line, the API and rule files: huge
integers, other scripts' digits, absurd durations, endless rule files.
Each ends in one line naming the field and its bound (exit 2 or a
ConfigError), quickly, never in a traceback."""

import os
import time

import pytest

from fastproxy import ConfigError, Proxy
from fastproxy.acl import MAX_RULE_FILE, MAX_RULE_LINE, read_rule_file
from fastproxy.values import MAX_DURATION, parse_address, parse_count, parse_duration, parse_size
from support.cli import assert_one_line_error, run_cli

HUGE = "99999999999999999999"
BASE = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"]

# Every count option, with the bound its error names.
COUNTS = [
    ("--workers", "1-1024"),
    ("--hook-threads", "1-1024"),
    ("--max-connections", "1-16777216"),
    ("--max-connections-per-ip", "1-16777216"),
    ("--queue-size", "1-16777216"),
    ("--rate-limit-table", "1-16777216"),
    ("--retries", "0-65535"),
    ("--max-fails", "0-65535"),
    ("--health-rise", "1-65535"),
    ("--health-fall", "1-65535"),
    ("--proxy-header-max", "16-65535"),
]


@pytest.mark.parametrize("flag,bound", COUNTS)
def test_a_huge_count_on_the_command_line_is_one_line_naming_its_bound(flag, bound):
    rc, out, err = run_cli(BASE + [flag, HUGE], timeout=20)
    assert_one_line_error(rc, out, err, flag, HUGE, bound)


@pytest.mark.parametrize("args,needles", [
    (["--upstream", "127.0.0.1:1,max-connections=" + HUGE], ["--upstream", "1-16777216"]),
    (["--upstream", "127.0.0.1:1@" + HUGE], ["--upstream", "0-256"]),
    (["--connect-timeout", "99999999999h"], ["--connect-timeout", "366 days"]),
    (["--idle-timeout", "99999999999h"], ["--idle-timeout", "366 days"]),
    (["--unix-user", HUGE], ["--unix-user", "out of range"]),
    (["--worker-cpus", "0-" + HUGE], ["--worker-cpus", "0-99999"]),
])
def test_other_huge_numbers_on_the_command_line_are_one_line(args, needles):
    rc, out, err = run_cli(BASE + args, timeout=20)
    assert_one_line_error(rc, out, err, *needles)


@pytest.mark.parametrize("name", [c[0][2:].replace("-", "_") for c in COUNTS])
def test_a_huge_count_in_the_api_is_a_config_error(name):
    with pytest.raises(ConfigError) as info:
        Proxy(listen="127.0.0.1:0", upstreams=["127.0.0.1:9"], **{name: 10**20})
    assert info.value.field == name and "out of range" in str(info.value)


@pytest.mark.parametrize("options,field,problem", [
    ({"upstreams": 5}, "upstreams", "expected a list of upstreams"),
    ({"upstreams": None, "upstream": "127.0.0.1:9", "stats": ("127.0.0.1", 83767)}, "stats",
     "port 83767 is out of range"),
    ({"upstreams": None, "upstream": "127.0.0.1:9", "stats": ("127.0.0.1\0junk", 18232)}, "stats",
     "control characters"),
    ({"upstreams": None, "upstream": "127.0.0.1:9", "stats": ("127.0.0.1", True)}, "stats", "HOST:PORT"),
    ({"upstreams": None, "upstream": "127.0.0.1:9", "resolver": ("127.0.0.1", 65536)}, "resolver",
     "port 65536 is out of range"),
])
def test_api_values_of_the_wrong_shape_or_range_are_config_errors(options, field, problem):
    with pytest.raises(ConfigError) as info:
        Proxy(listen="127.0.0.1:0", **options)
    assert info.value.field == field and problem in str(info.value)


def test_a_stats_pair_in_range_is_taken_as_its_text_is():
    config = Proxy(listen="127.0.0.1:0", upstream="127.0.0.1:9", stats=("::1", 8080)).config
    assert config.process.stats == ("::1", 8080)


def test_a_huge_int_duration_in_the_api_is_a_config_error_not_an_overflow():
    with pytest.raises(ConfigError, match="366 days"):
        Proxy(listen="127.0.0.1:0", upstreams=["127.0.0.1:9"], connect_timeout=10**400)
    with pytest.raises(ConfigError, match="366 days"):
        parse_duration(MAX_DURATION + 1, "d")
    assert parse_duration(MAX_DURATION, "d") == MAX_DURATION


# Full-width (U+FF10..), Arabic-Indic and superscript digits: int() and
# str.isdigit() take some of them; no user means them as a number.
FOREIGN = ["\uff18\uff10", "\u0668\u0660", "\u00b2"]


@pytest.mark.parametrize("digits", FOREIGN)
def test_other_scripts_digits_are_no_number_anywhere(digits):
    with pytest.raises(ConfigError, match="port"):
        parse_address(":" + digits, "listen", listen=True)
    with pytest.raises(ConfigError):
        parse_duration(digits + "s", "connect_timeout")
    with pytest.raises(ConfigError):
        parse_size(digits + "k", "max_hold")
    with pytest.raises(ConfigError):
        parse_count(digits, "workers")
    for name, value in (("upstreams", ["127.0.0.1:" + digits]), ("upstreams", ["127.0.0.1:9@" + digits]),
                        ("rate_limit_per_ip", digits + "/1s"), ("allow_time", "0" + digits[0] + ":00-10:00"),
                        ("unix_user", digits), ("worker_cpus", digits)):
        with pytest.raises(ConfigError):
            Proxy(listen="127.0.0.1:0", **{"upstreams": ["127.0.0.1:9"], name: value})


def test_a_full_width_port_on_the_command_line_is_refused():
    rc, out, err = run_cli(["--listen", ":\uff18\uff10", "--upstream", "127.0.0.1:9"], timeout=20)
    assert_one_line_error(rc, out, err, "--listen", "is not a number")


@pytest.mark.parametrize("path", ["/dev/zero", "fifo"])
def test_an_endless_rule_file_is_refused_at_once(tmp_path, path):
    if path == "fifo":
        path = str(tmp_path / "rules.fifo")
        os.mkfifo(path)   # nobody writes: reading it would block for ever
    began = time.monotonic()
    rc, out, err = run_cli(BASE + ["--allow-file", path], timeout=20)
    assert_one_line_error(rc, out, err, "--allow-file", path, "not a regular file")
    assert time.monotonic() - began < 15


@pytest.mark.parametrize("command", [["check"], []])
def test_a_directory_as_a_rule_file_is_one_line(tmp_path, command):
    rc, out, err = run_cli(command + BASE + ["--allow-file", str(tmp_path)], timeout=20)
    assert_one_line_error(rc, out, err, "--allow-file", str(tmp_path), "is a directory, not a rule file")


@pytest.mark.parametrize("name", ["allow_file", "deny_file"])
@pytest.mark.parametrize("value", [[5], [True], [[]], 5, [None]])
def test_a_rule_file_that_is_no_path_is_a_config_error(name, value):
    with pytest.raises(ConfigError) as info:
        Proxy(listen="127.0.0.1:0", upstream="127.0.0.1:9", **{name: value})
    assert info.value.field == name and "expected a file path" in str(info.value)


def test_a_rule_file_too_large_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.txt"
    with open(path, "wb") as f:
        f.truncate(MAX_RULE_FILE + 1)   # sparse: costs no disk
    with pytest.raises(ConfigError, match=f"at most {MAX_RULE_FILE}"):
        read_rule_file(path, "deny_file")


def test_a_long_rule_line_is_refused_and_errors_quote_a_capped_part(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("10.0.0.0/8\n" + "1.2.3.4 " * 1000 + "\n")
    with pytest.raises(ConfigError, match=f"{path}:2.*at most {MAX_RULE_LINE}"):
        read_rule_file(path, "deny_file")
    path.write_text("x" * 1000 + "/8\n")
    with pytest.raises(ConfigError) as info:
        read_rule_file(path, "deny_file")
    assert len(str(info.value)) < 400 and "1002 characters" in str(info.value)
    rc, out, err = run_cli(BASE + ["--deny-file", str(path)], timeout=20)
    assert_one_line_error(rc, out, err, "--deny-file", "1002 characters")
    assert len(err) < 400


def test_a_huge_value_is_quoted_capped_in_the_error():
    rc, out, err = run_cli(BASE + ["--workers", "9" * 100000], timeout=20)
    assert_one_line_error(rc, out, err, "--workers", "1-1024", "100000 characters")
    assert len(err) < 400


def test_an_endless_config_file_is_refused_after_its_bound():
    from fastproxy.configfile import MAX_CONFIG_FILE
    rc, out, err = run_cli(["--config", "/dev/zero"], timeout=20)
    assert_one_line_error(rc, out, err, "/dev/zero", f"larger than {MAX_CONFIG_FILE} bytes")


def test_a_config_file_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100000 + "]" * 100000 + "\n")
    rc, out, err = run_cli(["check", "--config", str(path)], timeout=20)
    assert_one_line_error(rc, out, err, str(path), "nested too deeply")


@pytest.mark.parametrize("where", ["top", "listener"])
def test_a_huge_unknown_key_is_quoted_capped_in_the_error(tmp_path, where):
    key = "k" * 100000
    one = '[[listeners]]\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:9"]\n'
    path = tmp_path / "keys.toml"
    path.write_text(f"{key} = 1\n{one}" if where == "top" else f"{one}{key} = 1\n")
    rc, out, err = run_cli(["check", "--config", str(path)], timeout=20)
    assert_one_line_error(rc, out, err, str(path), "characters)", "is not a")
    assert len(err) < 400
