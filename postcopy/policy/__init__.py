"""Per-domain policy: which domains and disks migrate post-copy, and their settings (`config`)."""
