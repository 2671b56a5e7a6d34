"""Subcommands of `postcopy`, one module each (see `postcopy.cli`)."""
