"""The per-domain policy file and the size/rate parsers: valid files, and errors that name
file, line and problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.errors import UserError
from postcopy.policy import (
    ConfigError,
    MigrationMode,
    NbdEndpoint,
    load_config,
    parse_config,
    parse_nbd_address,
)
from postcopy.units import UnitError, format_size, parse_bit_rate, parse_rate, parse_size

DATA = Path(__file__).parents[1] / "data"


# --- units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64K", 65536),
        ("64k", 65536),
        ("64KiB", 65536),
        ("64KB", 65536),
        ("1M", 1 << 20),
        ("1.5K", 1536),
        ("2G", 2 << 30),
        ("4096", 4096),
        (" 1 T ", 1 << 40),
        (512, 512),
    ],
)
def test_parse_size_reads_binary_suffixes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "abc", "-1", "1Q", "0.1K", "1.5", "1iB", "64Kb/s", True])
def test_parse_size_refuses_malformed_sizes(text: str) -> None:
    with pytest.raises(UnitError):
        parse_size(text)


def test_parse_rate_is_bytes_per_second_and_zero_means_unlimited() -> None:
    assert parse_rate("200M") == 200 * 1024 * 1024
    assert parse_rate("200MiB/s") == 200 * 1024 * 1024
    assert parse_rate("1048576") == 1 << 20
    assert parse_rate(0) is None
    assert parse_rate("0") is None
    assert parse_rate("unlimited") is None
    with pytest.raises(UnitError):
        parse_rate("fast")


def test_parse_bit_rate_uses_decimal_prefixes() -> None:
    assert parse_bit_rate("1G") == 10**9
    assert parse_bit_rate("100M") == 10**8
    assert parse_bit_rate("1Gbit") == 10**9
    assert parse_bit_rate("2.5G") == 2_500_000_000
    with pytest.raises(UnitError):
        parse_bit_rate("0")


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_scales_every_integer(number: int, suffix: str) -> None:
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suffix]
    assert parse_size(f"{number}{suffix}") == number * factor


def test_format_size_is_readable() -> None:
    assert format_size(512) == "512 B"
    assert format_size(65536) == "64 KiB"
    assert format_size(3 << 29) == "1.5 GiB"


# --- a valid file -----------------------------------------------------------------------------


def test_example_policy_file_loads_every_domain() -> None:
    config = load_config(DATA / "domains.toml", environ={})
    assert config.domain_names() == ["web1", "db-primary", "qemu-guest", "build", "nfs-guest"]

    web1 = config.domain("web1")
    assert web1.mode is MigrationMode.POSTCOPY and web1.listed
    assert web1.chunk_size == 256 * 1024  # the domain overrides the default 64K
    assert web1.bandwidth == 200 * 1024 * 1024  # inherited from [defaults]
    root, data = web1.disks
    assert (root.device, root.export) == ("xvda", "web1-xvda")
    assert root.dest_file == root.source_image == Path("/srv/xen/web1-root.img")
    assert data.dest_file == Path("/srv/xen/incoming/web1-data.img")
    assert web1.state_dir(root) == Path("/var/lib/postcopy/web1/xvda")
    assert web1.dest_socket(root) == Path("/run/postcopy/web1-xvda.sock")
    assert web1.dest_endpoint(root).uri() == (
        "nbd+unix:///web1-xvda?socket=/run/postcopy/web1-xvda.sock"
    )
    assert web1.source_endpoint(data).uri() == "nbd://host-a.example:10809/web1-data"

    db = config.domain("db-primary")
    assert db.bandwidth is None
    wal = db.disk("vdb")
    assert wal.listen == ("127.0.0.1", 10811)
    assert db.dest_endpoint(wal).uri() == "nbd://127.0.0.1:10811/db-primary-vdb"
    assert db.source_endpoint(wal).uri() == (
        "nbd+unix:///db-primary-vdb?socket=/run/postcopy/tunnel-a.sock"
    )
    assert config.domain("build").mode is MigrationMode.PRECOPY
    assert config.domain("nfs-guest").mode is MigrationMode.SHARED


def test_postcopy_disks_lists_every_disk_of_postcopy_domains() -> None:
    config = load_config(DATA / "domains.toml", environ={})
    pairs = [(domain.name, disk.device) for domain, disk in config.postcopy_disks()]
    assert pairs == [
        ("web1", "xvda"),
        ("web1", "xvdb"),
        ("db-primary", "vda"),
        ("db-primary", "vdb"),
        ("qemu-guest", "disk0"),
    ]
    state_dirs = [str(domain.state_dir(disk)) for domain, disk in config.postcopy_disks()]
    assert state_dirs[2] == "/var/lib/postcopy/db-primary/vda"


def test_unlisted_domain_defaults_to_precopy() -> None:
    config = parse_config("", "empty.toml")
    domain = config.domain("someone-else")
    assert domain.mode is MigrationMode.PRECOPY
    assert not domain.listed and domain.disks == ()
    assert domain.chunk_size == 64 * 1024 and domain.bandwidth is None


def test_defaults_mode_shared_applies_to_unlisted_domains() -> None:
    config = parse_config('[defaults]\nmode = "shared"\n', "f.toml")
    assert config.domain("x").mode is MigrationMode.SHARED


def test_policy_is_frozen() -> None:
    domain = load_config(DATA / "domains.toml", environ={}).domain("web1")
    with pytest.raises(AttributeError):
        domain.mode = MigrationMode.PRECOPY  # type: ignore[misc]


def test_unknown_disk_and_missing_source_are_user_errors() -> None:
    config = parse_config(
        '[domains.a]\nmode = "postcopy"\n[[domains.a.disks]]\ndevice = "vda"\n'
        'source_image = "/i.img"\n',
        "f.toml",
    )
    domain = config.domain("a")
    with pytest.raises(UserError, match="no disk 'vdz'"):
        domain.disk("vdz")
    with pytest.raises(UserError, match="sets no 'source'"):
        domain.source_endpoint(domain.disks[0])


# --- where the file comes from ------------------------------------------------------------------


def test_config_path_option_beats_environment_beats_default(tmp_path: Path) -> None:
    from_option = tmp_path / "a.toml"
    from_env = tmp_path / "b.toml"
    from_option.write_text('[domains.a]\nmode = "shared"\n')
    from_env.write_text('[domains.b]\nmode = "shared"\n')
    env = {"POSTCOPY_CONFIG": str(from_env)}
    assert load_config(from_option, environ=env).domain_names() == ["a"]
    assert load_config(None, environ=env).domain_names() == ["b"]


def test_missing_explicit_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"^{missing}: no such file$"):
        load_config(missing, environ={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, environ={"POSTCOPY_CONFIG": str(missing)})


def test_non_utf8_file_names_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[defaults]\nmode = "pre\xffcopy"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad, environ={})
    assert (info.value.line, info.value.problem) == (2, "not UTF-8 text")


# --- errors name the file, the line and the problem --------------------------------------------

VALID_HEAD = """\
# rack 4
[defaults]
chunk_size = "64K"

[domains.web1]
mode = "postcopy"

[[domains.web1.disks]]
device = "xvda"
source_image = "/srv/web1.img"
"""


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "/etc/postcopy/domains.toml")
    return info.value


@pytest.mark.parametrize(
    ("tail", "line", "fragment"),
    [
        # an unknown key in a disk table
        ('\n[[domains.web1.disks]]\ndevice = "xvdb"\nsource_imgae = "/x"\n', 14,
         "domains.web1.disks[1].source_imgae: unknown key 'source_imgae'"),
        # the same device twice
        ('\n[[domains.web1.disks]]\ndevice = "xvda"\nsource_image = "/other.img"\n', 13,
         "duplicate disk 'xvda' (first on line 9)"),
        # two disks writing one destination file
        ('\n[[domains.web1.disks]]\ndevice = "xvdb"\nsource_image = "/srv/web1.img"\n', 14,
         "duplicate disk: '/srv/web1.img' is also the destination of web1/xvda"),
        # a mode that does not exist
        ('\n[domains.db]\nmode = "lazy"\n', 13,
         "domains.db.mode: mode 'lazy' is not one of postcopy, precopy, shared"),
        # a bad size, and a size that is not a power of two
        ('\n[domains.db]\nchunk_size = "64Q"\n', 13, "domains.db.chunk_size: size '64Q'"),
        ('\n[domains.db]\nchunk_size = "48K"\n', 13, "must be a power of two"),
        ('\n[domains.db]\nchunk_size = "128M"\n', 13, "must be a power of two from 4K to 64M"),
        ('\n[domains.db]\nbandwidth = "fast"\n', 13, "domains.db.bandwidth: rate 'fast'"),
        # wrong types
        ('\n[domains.db]\nmode = 1\n', 13, "domains.db.mode: must be a string, not an integer"),
        ('\n[domains.db]\nchunk_size = true\n', 13, "must be a size like \"64K\", not a boolean"),
        ('\n[domains.db]\ndisks = "vda"\n', 13, "must be an array of tables"),
        ('\n[domains.db]\nstate_root = "relative/dir"\n', 13, "must be an absolute path"),
        # a postcopy domain without disks, a disk without image, a bad address
        ('\n[domains.db]\nmode = "postcopy"\n', 12, "postcopy domain 'db' lists no"),
        ('\n[[domains.web1.disks]]\ndevice = "xvdb"\n', 12, "disk needs 'source_image'"),
        ('\n[domains.db]\nsource = "http://a/"\n', 13, "is not nbd://HOST[:PORT]"),
        ('\n[domains.db]\nsource = "nbd://a:10809/exp"\n', 13, "names an export"),
        ('\n[[domains.web1.disks]]\ndevice = "xvdb"\nsource_image = "/b"\nlisten = "x"\n', 15,
         "'x' is not HOST:PORT"),
        ('\n[domains.db]\nsocket_dir = "/' + "d" * 120 + '"\nmode = "postcopy"\n'
         'disks = [{device = "vda", source_image = "/db.img"}]\n', 13,
         "longer than 107 bytes"),
        # an unknown top-level table
        ('\n[domain.db]\nmode = "postcopy"\n', 12, "domain: unknown key 'domain'"),
    ],
)  # fmt: skip
def test_semantic_error_names_file_line_and_problem(tail: str, line: int, fragment: str) -> None:
    error = _error(VALID_HEAD + tail)
    assert error.file == "/etc/postcopy/domains.toml"
    assert error.line == line, str(error)
    assert fragment in error.problem
    assert str(error).startswith(f"/etc/postcopy/domains.toml:{line}: ")


def test_error_inside_inline_table_names_its_line() -> None:
    error = _error(
        """\
        [domains.db]
        mode = "postcopy"
        disks = [
            { device = "vda", source_image = "/a.img" },
            # a comment with ] and " in it
            { device = "vdb", source_image = '''/b.img''', sauce = 1 },
        ]
        """
    )
    assert error.line == 6
    assert "domains.db.disks[1].sauce: unknown key" in error.problem


def test_line_finder_skips_multiline_strings_and_quoted_keys() -> None:
    error = _error(
        '''\
        [defaults]
        # a multi-line string that looks like a table header inside
        source = """
        [domains.fake]
        mode = "lazy"
        """

        [domains."db.primary"]
        "mode" = "lazy"
        '''
    )
    # tomllib accepts the source as a string, then our check refuses it; the first error found
    # is the source address on line 3.
    assert error.line == 3 and "defaults.source" in error.problem


def test_quoted_domain_key_error_has_right_line() -> None:
    error = _error('[defaults]\n\n[domains."db.primary"]\n# x\n"mode" = "lazy"\n')
    assert error.line == 5
    assert 'domains."db.primary".mode' in error.problem


def test_default_mode_postcopy_is_refused() -> None:
    error = _error('[defaults]\nmode = "postcopy"\n')
    assert error.line == 2 and "default mode cannot be postcopy" in error.problem


def test_syntax_error_carries_tomllib_line_and_column() -> None:
    error = _error('[defaults]\nmode = "precopy"\nmode = "shared"\n')
    assert error.line == 3
    assert error.problem.startswith("TOML syntax: column")


def test_duplicate_listen_address_is_refused() -> None:
    error = _error(
        VALID_HEAD + '\n[domains.db]\nmode = "postcopy"\n'
        'disks = [{device = "vda", source_image = "/a", listen = "127.0.0.1:10900"},\n'
        '         {device = "vdb", source_image = "/b", listen = "127.0.0.1:10900"}]\n'
    )
    assert error.line == 15 and "also used by db/vda" in error.problem


# --- NBD addresses ------------------------------------------------------------------------------


def test_nbd_addresses_and_uris() -> None:
    assert parse_nbd_address("nbd://a.example") == NbdEndpoint(host="a.example", port=10809)
    assert (
        parse_nbd_address("nbds://10.0.0.1:777").with_export("x").uri() == "nbds://10.0.0.1:777/x"
    )
    assert parse_nbd_address("nbd://[fd00::1]:99").with_export("e").uri() == "nbd://[fd00::1]:99/e"
    unix = parse_nbd_address("nbd+unix:///?socket=/run/a.sock")
    assert unix == parse_nbd_address("unix:/run/a.sock") == parse_nbd_address("/run/a.sock")
    assert unix.with_export("web 1").uri() == "nbd+unix:///web%201?socket=/run/a.sock"
    for bad in ("unix:rel.sock", "nbd://", "nbd+unix:///", "tcp://a:1"):
        with pytest.raises(ValueError):
            parse_nbd_address(bad)


def test_documented_policy_example_loads_and_plan_matches_the_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/integrations.md's example file is valid and its `--plan` output is what we print."""
    import re

    from postcopy.cli import main

    doc = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    toml_block = re.search(r"```toml\n(.*?)```", doc, re.S)
    plan_block = re.search(r"\$ postcopy config --domain web1 --plan\n(.*?)```", doc, re.S)
    assert toml_block is not None and plan_block is not None
    policy = tmp_path / "domains.toml"
    policy.write_text(toml_block[1])
    config = load_config(policy, environ={})
    assert config.domain("web1").mode is MigrationMode.POSTCOPY
    assert config.domain("not-listed").mode is MigrationMode.PRECOPY
    assert main(["config", "--config", str(policy), "--domain", "web1", "--plan"]) == 0
    assert capsys.readouterr().out == plan_block[1]


def test_line_finder_handles_every_kind_of_toml_value() -> None:
    error = _error(
        '''\
        [defaults]
        source = "nbd://a.example"   # comment with "quotes" and ] brackets
        state_root = '/var/lib/pc#not-a-comment'

        [domains.a]
        mode = """shared"""
        chunk_size = 65536
        bandwidth = 'unlimited'

        [domains.b]
        disks = [
          { device = "vda", source_image = "/b.img", export = "b\\"q" },   # escaped quote
          { device = 'vdb', source_image = '/c.img', dest_file = """/d.img""" },
        ]
        mode = "postcopy"

        [domains."c.d"]
        mode = "shared"
        [domains.e]
        mode = "precopy"
        state_root = 7
        '''
    )
    assert error.line == 21 and "domains.e.state_root: must be a string" in error.problem


def test_unusual_toml_values_elsewhere_do_not_break_line_finding() -> None:
    # Dates, floats, nested arrays and multi-line literal strings in a wrong place still give
    # the line of the real problem.
    error = _error(
        "[defaults]\n"
        "mode = 'precopy'\n"
        "[domains.a]\n"
        "state_root = '''\n/var/lib/x'''\n"
        "[domains.b]\n"
        "when = 1979-05-27 07:32:00Z\n"
    )
    assert error.line == 7 and "domains.b.when: unknown key" in error.problem
    error = _error("[domains.b]\nchunk_size = [[1, 2], [3]]\n")
    assert error.line == 2 and "must be a size" in error.problem
    error = _error("[domains.b]\nchunk_size = 6.5e3\n")
    assert error.line == 2 and "not a number" in error.problem


_VALID_LINES = [
    'mode = "shared"',
    'chunk_size = "128K"',
    "bandwidth = 1048576",
    'state_root = """/srv/state"""',
    "# a comment = with [brackets]",
    "",
    "socket_dir = '/run/x'",
]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["table", "dotted", "quoted"]),
            st.lists(st.sampled_from(_VALID_LINES), max_size=4),
        ),
        min_size=1,
        max_size=6,
    ),
    st.data(),
)
def test_error_line_is_found_in_any_layout(
    layouts: list[tuple[str, list[str]]], data: st.DataObject
) -> None:
    """Whatever the layout of the domains before it, an unknown key is reported on its line."""
    bad_domain = data.draw(st.integers(min_value=0, max_value=len(layouts) - 1))
    lines = ["[defaults]", "# policy"]
    expected = 0
    for index, (style, body) in enumerate(layouts):
        name = f"dom{index}"
        keys = [line for line in body if "=" in line and not line.startswith("#")]
        keys = list(dict.fromkeys(line.split("=")[0].strip() for line in keys))
        chosen = {key: next(v for v in body if v.startswith(key + " ")) for key in keys}
        current_table = next((x for x in reversed(lines) if x.startswith("[")), "")
        if style == "table":
            lines.append(f"[domains.{name}]")
            lines += list(chosen.values())
        elif style == "quoted":
            lines.append(f'[domains."{name}"]')
            lines += [f'"{k}" = {v.split("=", 1)[1].strip()}' for k, v in chosen.items()]
        else:
            if current_table != "[domains]":
                lines.append("[domains]")  # a second [domains] is a TOML error: skipped below
            lines += [f"{name}.{v}" for v in chosen.values()]
        if index == bad_domain:
            if style == "dotted":
                lines.append(f"{name}.colour = 'red'")
            elif style == "quoted":
                lines.append("\"colour\" = 'red'")
            else:
                lines.append("colour = 'red'")
            expected = len(lines)
    text = "\n".join(lines) + "\n"
    try:
        parse_config(text, "p.toml")
    except ConfigError as error:
        if "TOML syntax" in error.problem:
            return  # a dotted domain after [domains.x] tables is a TOML redefinition; skip
        assert error.line == expected, text
        assert f"dom{bad_domain}.colour: unknown key" in error.problem
    else:
        raise AssertionError("no error")
