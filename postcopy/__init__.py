"""postcopy: live-migrate a VM's disk lazily over NBD (see README.md and ARCHITECTURE.md)."""
