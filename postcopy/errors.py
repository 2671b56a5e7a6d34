"""Errors of the postcopy service.

    PostcopyError
    ├── UserError          an operator can fix it: bad argument, missing file, bad config;
    │                      the CLI prints it as one line and exits 2
    └── StateError         a state directory that is corrupt or belongs to another disk
"""


class PostcopyError(Exception):
    """Base of every error raised by the postcopy package."""


class UserError(PostcopyError):
    """A problem the operator can fix; its message is one line, shown as is."""


class StateError(UserError):
    """A state directory that does not match the disk, or cannot be read."""
