"""What the benchmark servers import: ``served:app`` (see benchapp.py)."""

from benchapp import server_app

app = server_app()
