"""The userspace L7 HTTP reverse proxy (mode: l7 VIPs), run by the agent."""
