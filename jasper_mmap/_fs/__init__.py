"""File-system primitives: regular-file JSON reads, atomic publication, locks."""
