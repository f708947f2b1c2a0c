"""btmm: one person's machines find each other through DNS and talk over ESP-in-UDP tunnels."""

__version__ = "0.1.0"
