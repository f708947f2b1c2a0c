"""SSH single sign-on: OpenSSH certificates signed by a per-device CA bound to the account."""
