"""The settings contract of Host B (`postcopy.destination.settings`): every setting survives the
trip through nbdkit's key=value parameters and through receive's command line (written by the
code that reads it back), a bad value is a one-line error naming its key or option, and the
engine's configuration gets every setting and the same defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from postcopy.cli import build_parser
from postcopy.commands.receive import settings_from_arguments
from postcopy.destination.engine import EngineConfig
from postcopy.destination.settings import (
    PLUGIN_KEYS,
    RECEIVE_OPTIONS,
    SETTINGS,
    STATE_LOCK_FD_KEY,
    DestinationSettings,
    Scope,
    SettingError,
    from_plugin_parameters,
    plugin_key,
    plugin_parameters,
    receive_arguments,
)
from tests.fakes import FakeSource

REQUIRED = {"source": "nbd://host-a:10809/disk", "dest": Path("/d.img"), "state_dir": Path("/s")}
PLUGIN_ONLY = [s.name for s in SETTINGS if s.scope is Scope.PLUGIN]
RECEIVE_ONLY = [s.name for s in SETTINGS if s.scope is Scope.RECEIVE]

# every setting away from its default, at an edge: the extremes of each range, empty and odd text
EDGES: dict[str, Any] = {
    "domain": "web 1 = ünï",
    "source": "nbd+unix:///a%20b=c?socket=/run/x y=z.sock",
    "dest": Path("/srv/a disk=x.img"),
    "state_dir": Path("/var/lib/post copy/=state"),
    "listen": ("::1", 65535),
    "chunk_size": 64 * 1024 * 1024,
    "bandwidth": 1,
    "source_id": "web1/xvda = the old one",
    "wait_for_source": True,
    "export_name": "",  # the empty export, which is not "the URI's" (None)
    "threads": 1,
    "source_timeout": 5e-324,
    "request_timeout": 1e300,
    "drain_requests": 0,
    "drain_request_size": 4096,
    "drain_requests_during_faults": 1 << 40,
    "blocking_misses": False,
}


def edge_settings(names: list[str]) -> DestinationSettings:
    return DestinationSettings(**{**REQUIRED, **{name: EDGES[name] for name in names}})


def test_the_edge_values_move_every_setting_off_its_default() -> None:
    assert sorted(EDGES) == sorted(s.name for s in SETTINGS if s.name != "socket")
    for setting in SETTINGS:
        if setting.name in EDGES and not setting.required:
            assert EDGES[setting.name] != setting.default, setting.name


def test_every_plugin_setting_survives_the_nbdkit_parameters() -> None:
    plugin = [s.name for s in SETTINGS if Scope.PLUGIN in s.scope]
    settings = edge_settings(plugin)
    parameters = plugin_parameters(settings, state_lock_fd=7)
    assert sorted(parameters) == sorted(PLUGIN_KEYS)
    assert parameters["source_timeout"] == "5e-324" and parameters["export_name"] == ""
    assert from_plugin_parameters(parameters) == (settings, 7)
    # as nbdkit hands them over: `key=value` split at the first "="
    words = [f"{key}={value}" for key, value in parameters.items()]
    split = dict(word.split("=", 1) for word in words)
    assert from_plugin_parameters(split) == (settings, 7)


def test_defaults_survive_the_nbdkit_parameters_and_none_is_left_out() -> None:
    settings = DestinationSettings(**REQUIRED)
    parameters = plugin_parameters(settings)
    assert "bandwidth" not in parameters and "export_name" not in parameters
    assert STATE_LOCK_FD_KEY not in parameters
    assert parameters["chunk_size"] == "65536" and parameters["wait_for_source"] == "0"
    assert from_plugin_parameters(parameters) == (settings, None)
    # only the required keys: every other setting takes its default
    assert from_plugin_parameters({k: str(v) for k, v in REQUIRED.items()}) == (settings, None)


def test_receive_only_settings_never_reach_nbdkit() -> None:
    parameters = plugin_parameters(edge_settings(list(EDGES)))
    assert not set(RECEIVE_ONLY) & set(parameters)
    assert set(RECEIVE_ONLY) == {"domain", "socket", "listen", "threads"}


@pytest.mark.parametrize("where", ["listen", "socket"])
def test_every_receive_option_survives_the_command_line(where: str) -> None:
    names = [s.name for s in RECEIVE_OPTIONS if s.name not in ("socket", "listen")]
    settings = edge_settings(names)
    if where == "socket":
        settings = dataclasses.replace(settings, socket=Path("/run/post copy/d.sock"))
    else:
        settings = dataclasses.replace(settings, listen=EDGES["listen"])
    argv = ["receive", *receive_arguments(settings)]
    assert ("[::1]:65535" in argv) == (where == "listen")
    assert settings_from_arguments(build_parser().parse_args(argv)) == settings


def test_receive_arguments_leave_out_defaults_but_state_the_chunk_size() -> None:
    settings = DestinationSettings(**REQUIRED, socket=Path("/run/d.sock"))
    assert receive_arguments(settings) == [
        "--source", "nbd://host-a:10809/disk", "--dest", "/d.img", "--state-dir", "/s",
        "--socket", "/run/d.sock", "--chunk-size", "65536",
    ]  # fmt: skip


def test_an_alias_names_the_same_setting_on_both_sides() -> None:
    argv = ["receive", "--source", "nbd://h/", "--dest", "/d", "--state-dir", "/s",
            "--socket", "/x.sock", "--unreachable-timeout", "0.5"]  # fmt: skip
    assert settings_from_arguments(build_parser().parse_args(argv)).source_timeout == 0.5
    assert plugin_key("unreachable_timeout") == "source_timeout"
    parameters = {**{k: str(v) for k, v in REQUIRED.items()}, "source_timeout": "0.5"}
    settings, _ = from_plugin_parameters(parameters)
    assert settings.source_timeout == 0.5


def test_paths_are_read_as_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings, _ = from_plugin_parameters({"source": "nbd://h/", "dest": "d.img", "state_dir": "s"})
    assert settings.dest == tmp_path / "d.img" and settings.state_dir == tmp_path / "s"


@pytest.mark.parametrize(
    ("key", "text", "problem"),
    [
        ("source", "ftp://x", "is not an NBD URI"),
        ("dest", "", "an empty path"),
        ("chunk_size", "48K", "must be a power of two"),
        ("chunk_size", "64Q", "is not a number with an optional K/M/G/T suffix"),
        ("chunk_size", "128M", "must be a power of two"),
        ("bandwidth", "fast", "is not a number"),
        ("bandwidth", "-5M", "is not a number"),
        ("wait_for_source", "maybe", "is not one of 1, true, yes, 0, false, no"),
        ("source_timeout", "0", "is not a positive number of seconds"),
        ("source_timeout", "nan", "is not a positive number of seconds"),
        ("source_timeout", "soon", "is not a number of seconds"),
        ("request_timeout", "-inf", "is not a positive number of seconds"),
        ("drain_requests", "-1", "must be at least 0"),
        ("drain_request_size", "lots", "is not a number"),
        ("drain_requests_during_faults", "1.5", "is not a whole number"),
        ("blocking_misses", "2", "is not one of"),
        (STATE_LOCK_FD_KEY, "-3", "must be at least 0"),
    ],
)  # fmt: skip
def test_a_bad_parameter_is_one_line_naming_its_key(key: str, text: str, problem: str) -> None:
    parameters = {**{k: str(v) for k, v in REQUIRED.items()}, key: text}
    with pytest.raises(SettingError) as caught:
        from_plugin_parameters(parameters)
    message = str(caught.value)
    assert message.startswith(f"{key}: ") and problem in message, message
    assert "\n" not in message


def test_unknown_and_missing_parameters_are_one_line() -> None:
    with pytest.raises(SettingError, match=r"^unknown parameter 'bogus' \(known: source, dest,"):
        plugin_key("bogus")
    with pytest.raises(SettingError, match=r"^missing parameter\(s\): dest, state_dir$"):
        from_plugin_parameters({"source": "nbd://h/"})


@pytest.mark.parametrize(
    ("option", "text"),
    [("--listen", "nohost"), ("--threads", "0"), ("--source-timeout", "inf"), ("--dest", "")],
)
def test_a_bad_option_is_one_line_naming_the_option(option: str, text: str) -> None:
    argv = ["receive", "--source", "nbd://h/", "--dest", "/d", "--state-dir", "/s"]
    argv += [option, text] if option == "--listen" else ["--socket", "/x.sock", option, text]
    with pytest.raises(SettingError) as caught:
        settings_from_arguments(build_parser().parse_args(argv))
    assert str(caught.value).startswith(f"{option}: ") and "\n" not in str(caught.value)


def test_the_engine_config_has_the_settings_defaults() -> None:
    assert EngineConfig.from_settings(DestinationSettings(**REQUIRED)) == EngineConfig(
        source_uri=REQUIRED["source"], dest_path=REQUIRED["dest"], state_dir=REQUIRED["state_dir"]
    )


@pytest.mark.parametrize("name", [s.name for s in SETTINGS if Scope.PLUGIN in s.scope])
def test_every_plugin_setting_reaches_the_engine(name: str) -> None:
    base = EngineConfig.from_settings(DestinationSettings(**REQUIRED))
    changed = EngineConfig.from_settings(
        dataclasses.replace(DestinationSettings(**REQUIRED), **{name: EDGES[name]})
    )
    differences = [
        f.name for f in dataclasses.fields(EngineConfig)
        if getattr(base, f.name) != getattr(changed, f.name)
    ]  # fmt: skip
    assert len(differences) == 1, (name, differences)


def test_plugin_only_settings_are_the_drains_tuning() -> None:
    assert PLUGIN_ONLY == [
        "drain_requests", "drain_request_size", "drain_requests_during_faults", "blocking_misses",
    ]  # fmt: skip


def test_the_engine_opens_the_map_under_the_identity_receive_checks(make_engine: Any) -> None:
    source = FakeSource(bytes(range(256)) * 1024, export_name="disk")
    engine = make_engine(source, export_name="disk", source_id="web1/xvda")
    assert engine.map.identity == engine.config.map_identity(engine.size)
    assert engine.map.identity.source_id == "web1/xvda"
    plain = make_engine(source, state="other")
    assert plain.map.identity == plain.config.map_identity(plain.size)
    assert plain.map.identity.source_id == plain.config.source_uri
