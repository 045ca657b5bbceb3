"""Subcommands of the ``thinkdiff`` command line (see ``thinkdiff.cli``)."""
