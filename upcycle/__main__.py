from upcycle.cli import app

app()
