"""The postcopy test suite; shared helpers are `tests.fakes`, `tests.peers`, `tests.guest`."""
