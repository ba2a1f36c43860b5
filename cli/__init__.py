"""Command-line configs and user errors shared by every entry point."""
