"""Host A: `postcopy serve` from the outside."""
