"""Built-in experiment trackers (kdbench.trackers): one plugin per file."""
