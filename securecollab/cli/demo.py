"""`securecollab demo`: the pipeline end to end (every protocol, the attack experiments, the scorecard), shown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from securecollab.cli.options import Clients, Model, Seed
from securecollab.cli.output import ShowProgress, attack_table, console, print_table, table, wide_console

app = typer.Typer()


def print_he_examples(result: dict) -> None:
    """The HE run's examples (decrypted vs plaintext logits, one query each) and its whole-test-set summary."""
    m = result["metrics"]
    print_table(table(f"encrypted inference ({m['model']}, x^2 activations): decrypted vs plaintext, one query each",
                      ["test image", "label", "plaintext", "decrypted", "max |logit error|"],
                      ([str(e["index"]), str(e["label"]), str(e["plaintext"]), str(e["decrypted"]),
                        f"{e['max_abs_logit_error']:.1e}"] for e in result["examples"])))
    console.print(f"whole test set, batched: argmax agreement {m['batched_argmax_agreement']:.3f}, max |logit error| "
                  f"{m['batched_max_abs_logit_error']:.1e}; one query {m['single_latency_s']:.2f}s, "
                  f"session keys {m['session_key_bytes'] / 1e6:.1f} MB")


def _after_step(event) -> None:
    if event.step == "he_inference" and event.result is not None:
        print_he_examples(event.result)
    if event.step == "mpc_inference" and event.result is not None:
        m = event.result["metrics"]
        console.print(f"model-private inference ({m['model']}, {m['n_parties']} parties, output {m['output']}): "
                      f"labels equal to the plaintext model's for {m['label_agreement']:.3f} of the test set; one "
                      f"query {m['single_latency_s']:.2f}s; the parties sent "
                      f"{m['party_bytes_sent_per_image'] / 1e3:.0f} kB per image")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Fewer rounds (5 instead of 10) and the attack experiments' quick "
                                             "settings (fewer runs, images, shadow models): minutes, not an hour.")] = False,
    out: Annotated[Path, typer.Option(help="Where scorecard.json/.md and figures are written.")] = Path("results"),
    model: Model = "mlp", clients: Clients = 4, seed: Seed = 0,
    attacks: Annotated[str, typer.Option(help="Attack experiments to run: all, none, or names separated by commas "
                                              "(see `securecollab attack list`).")] = "all",
):
    """Run every protocol on the embedded digits data, attack what each party received, print the scorecard."""
    from securecollab import pipeline
    from securecollab.scorecard import HEADERS, rows
    try:
        chosen = pipeline.chosen_experiments(attacks)  # a typo fails now, not after the protocols ran
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--attacks") from None
    with ShowProgress(on_done=_after_step) as progress:
        got = pipeline.demo(out, quick=quick, model=model, clients=clients, seed=seed, attacks=chosen,
                            progress=progress)
    out_console = wide_console(130)
    out_console.print(table(f"securecollab scorecard: {got.plan.dataset} / {got.plan.model} (baseline in brackets)",
                            HEADERS, rows(got.card)))
    if got.attack_rows:
        out_console.print(attack_table(got.attack_rows, "what each adversary learned (baseline: no transcript)"))
    console.print("wrote " + ", ".join(str(p) for p in got.paths))
    if got.failed:
        console.print(f"[red]attack experiments failed:[/red] {', '.join(f['experiment'] for f in got.failed)} "
                      "(see scorecard.json attack_errors)")
        for f in got.failed:  # the cause where the log's tail shows it (CI keeps only the tail)
            console.print(f"{f['experiment']}: {f['error']}", markup=False, highlight=False)
        raise typer.Exit(1)
