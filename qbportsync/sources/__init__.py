"""Sources of the forwarded port: a file the VPN client writes, or the gateway."""
