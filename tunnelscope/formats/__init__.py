"""Capture files: the link-type registry, classic pcap, pcapng, and the capture writers.

The lowest layer: nothing here imports the data path, the endpoints or the lab.
"""
