"""tunnelscope: capture, inspect and impair the UDP tunnels of emulator labs."""

__version__ = "0.1.0"
