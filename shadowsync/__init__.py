"""shadowsync package."""
