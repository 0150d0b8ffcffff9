"""Greylisting for qmail and beyond: one pure decision, stores by URL, thin front ends.

This package file imports nothing on purpose: the per-connection wrapper imports
``greylist.*`` modules once per SMTP connection, and every import here would be
paid 300,000 times a day.
"""

__version__ = "0.1.0"
