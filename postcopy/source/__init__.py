"""Host A: `serve` exports the stopped domain's disk images read-only over NBD (with `nbdsrv`)."""
