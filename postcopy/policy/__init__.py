"""Per-domain policy: which domains and disks migrate post-copy, and their settings.

`schema` holds the file's keys as frozen dataclasses; `loader` finds, parses and checks the TOML
file and builds them.  Import from here: the names below are the package's interface."""

from postcopy.policy.loader import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    add_config_argument,
    load_config,
    parse_config,
    resolve_config_path,
)
from postcopy.policy.schema import (
    ConfigError,
    DiskPolicy,
    DomainPolicy,
    MigrationMode,
    NbdEndpoint,
    PolicyConfig,
    parse_nbd_address,
)

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "DiskPolicy",
    "DomainPolicy",
    "MigrationMode",
    "NbdEndpoint",
    "PolicyConfig",
    "add_config_argument",
    "load_config",
    "parse_config",
    "parse_nbd_address",
    "resolve_config_path",
]
