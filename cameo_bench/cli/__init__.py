"""Subcommands of `cameo-bench`, one module each (see `cameo_bench.__main__`)."""
