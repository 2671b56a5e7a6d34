"""NBD protocol library tests: wire, cores, server and client against real peers."""
