"""The demo: a chat gateway, disconnecting load, a live view and an HTML report."""
