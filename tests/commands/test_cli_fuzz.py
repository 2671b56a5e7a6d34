"""Nonsense on the `postcopy` command line never produces a traceback: exit 0, 1 or 2, and at most
one line on stderr.  In-process (`postcopy.cli.main`), so thousands of cases stay fast.

Only bad argument lists are generated, so no command ever starts a server: every `receive` list
carries at least one value that `receive` refuses before it does anything (chunk size, rate,
timeouts, threads, listen address, URI), and every list for the other commands carries an option
that does not exist."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postcopy.cli import build_parser
from tests.peers import run_cli

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]

junk_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
BAD_VALUES = {
    "--chunk-size": st.sampled_from(["3", "0", "1000", "-64K", "64Q", "lots", "", "1e9", "128M"]),
    "--bandwidth": st.sampled_from(["lots", "-5M", "5X", "1.5.5M", "", "M", "1.3K"]),
    "--source-timeout": st.sampled_from(["-1", "0", "nan", "inf", "soon", "", "-inf"]),
    "--request-timeout": st.sampled_from(["-1", "0", "nan", "never", ""]),
    "--threads": st.sampled_from(["0", "-3", "many", "1.5"]),
    "--listen": st.sampled_from(["nohost", ":", "host:99999", "host:port", "[::1]"]),
    "--source": st.sampled_from(["ftp://x", "nbd://", "", "nbd+unix:///x", "nbd://h:0x10/", "::"]),
}
GOOD_VALUES = {
    "--chunk-size": st.sampled_from(["64K", "4096", "1M"]),
    "--bandwidth": st.sampled_from(["200M", "unlimited", "1G"]),
    "--source-timeout": st.sampled_from(["180", "0.5"]),
    "--request-timeout": st.sampled_from(["10", "1"]),
    "--threads": st.sampled_from(["1", "4"]),
    "--export-name": junk_text,
    "--source-id": junk_text,
    "--domain": junk_text,
}


@st.composite
def bad_receive_args(draw: st.DrawFn) -> list[str]:
    bad = draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), min_size=1, max_size=3, unique=True))
    args = ["receive", "--dest", "/nonexistent/d.img", "--state-dir", "/nonexistent/state"]
    if "--source" not in bad:
        args += ["--source", "nbd+unix:///disk?socket=/nonexistent/s.sock"]
    if "--listen" not in bad:
        args += ["--socket", "/nonexistent/d.sock"]
    for option in bad:
        args += [option, draw(BAD_VALUES[option])]
    for option in draw(st.lists(st.sampled_from(sorted(GOOD_VALUES)), max_size=3, unique=True)):
        if option not in bad:
            args += [option, draw(GOOD_VALUES[option])]
    order = draw(st.permutations(range(1, len(args) // 2 + 1)))
    pairs = [args[2 * i - 1:2 * i + 1] for i in order]
    return ["receive", *[token for pair in pairs for token in pair]]


@settings(max_examples=400, deadline=None)
@given(bad_receive_args())
def test_bad_receive_values_are_one_line_errors(argv: list[str]) -> None:
    code, stderr = run_cli(argv)
    assert code == 2, (argv, stderr)
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, (argv, stderr)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(SUBCOMMANDS),
    st.lists(st.one_of(junk_text, st.sampled_from(["--state-dir", "--config", "--json", "-"])),
             max_size=6),
    st.integers(min_value=0, max_value=6),
)
def test_random_tokens_with_an_unknown_option_never_trace_back(
    command: str, tokens: list[str], position: int
) -> None:
    tokens.insert(min(position, len(tokens)), "--no-such-option-at-all")
    code, stderr = run_cli([command, *tokens])
    assert code in (0, 1, 2), (command, tokens, stderr)
    assert stderr.count("\n") <= 1 and "Traceback" not in stderr, (command, tokens, stderr)


@settings(max_examples=300, deadline=None)
@given(st.lists(junk_text, max_size=4))
def test_garbage_instead_of_a_command_is_one_line(tokens: list[str]) -> None:
    argv = ["--not-a-command", *tokens]
    code, stderr = run_cli(argv)
    assert code == 2 and stderr.count("\n") == 1, (argv, stderr)
