"""The registry server: authoritative DNS with TSIG-signed UPDATE, update leases, SQLite storage."""
