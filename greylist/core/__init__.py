"""The pure core: the decision, values, keys, the check protocol and expiry.

No I/O and no clock here: every caller passes the time in.
"""
