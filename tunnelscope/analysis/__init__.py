"""Offline and passive analysis: decap (with its C scanner), sniff, compare, test traffic."""
