"""Offline tools beside the daemon: files to packets and classifications, reprocessing, dead-letter replay, the demo."""
