from securecollab.cli import app

app()
