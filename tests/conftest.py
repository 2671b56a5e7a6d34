"""Suite-wide set-up: the fixtures of the test guest (tests/guest/fixtures.py) for every folder.

Fixtures used by one folder live in that folder's conftest.py (tests/destination/conftest.py:
`make_engine`)."""

pytest_plugins = ["tests.guest.fixtures"]
