"""TURN relay client (RFC 8656): the allocation core and its asyncio driver."""
