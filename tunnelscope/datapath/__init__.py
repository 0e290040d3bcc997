"""The data path: impairments compiled to integers, BPF, the reference pipeline, the engine.

Read docs/pipeline.md first, then pipeline.py (the readable reference) and engine.py (links on
one loop, the library API under the commands). The C twin lives in tunnelscope/nio/.
"""
