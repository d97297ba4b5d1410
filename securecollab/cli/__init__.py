"""The `securecollab` command line, thin, on top of securecollab.pipeline: one module per command group.

demo (demo.py), demo-web (demo_web.py), train (train.py), serve ROLE (serve.py), infer (infer.py), health and certs (admin.py), make-npz (data.py),
client PROTOCOL (client.py), bench WHAT (bench.py), attack list|run|sweep (attack.py), report (report.py). Options that
several commands take are defined once, in options.py; what they print, in output.py.
"""

from __future__ import annotations

import typer

from securecollab.cli import admin, bench, client, data, demo, demo_web, infer, report, serve, train
from securecollab.cli.attack import attack_app

app = typer.Typer(
    help="Secure collaborative learning, measured: run protocols as gRPC services, attack what each "
         "party saw, and compare costs with plain training.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
for commands in (demo.app, demo_web.app, train.app):
    app.add_typer(commands)
app.add_typer(serve.app, name="serve")
for commands in (infer.app, admin.app, report.app, data.app):
    app.add_typer(commands)
app.add_typer(client.app, name="client")
app.add_typer(bench.app, name="bench")
app.add_typer(attack_app, name="attack")
