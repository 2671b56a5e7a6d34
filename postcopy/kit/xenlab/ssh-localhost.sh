#!/bin/sh
# The ssh stand-in for `xl migrate -s`: xl runs "PROGRAM HOST xl migrate-receive ..."; dropping the
# host and running the rest here makes a localhost migration.
shift
exec "$@"
