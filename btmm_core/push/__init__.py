"""DNS Push Notifications (RFC 8765) over DNS Stateful Operations (RFC 8490) on DNS over TLS:
the server core (a registry plug-in, ``server.py``) and the client core (``client.py``) with its
asyncio driver (``driver.py``)."""
