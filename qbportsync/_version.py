"""
Provides qbportsync version information.
"""

# This file is auto-generated! Do not edit!
# Use `incremental` to change this file.

from incremental import Version

__version__ = Version("qbportsync", 0, 1, 0)
__all__ = ["__version__"]
