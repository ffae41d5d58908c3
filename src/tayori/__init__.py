"""tayori (便り, "a letter"): a mail transfer agent.

The public surface is the ``tayori`` command (:mod:`tayori.cli`) and the configuration
file it reads; the modules below are implementation. See docs/architecture.md.
"""

__version__ = "0.1.0"
